"""`raydistill plan`'s pure parts: what each stage asks of Ray, and why a cluster cannot take it."""

from pathlib import Path

from raydistill.config import load_config
from raydistill.plan import Demand, demands, shortfalls

CONFIGS = Path(__file__).parents[2] / "jobs" / "configs"


def test_gpu_config_asks_for_tensor_parallel_engines_gpu_workers_and_replicas():
    by_stage = {d.stage: d for d in demands(load_config(CONFIGS / "gpu_qwen3_moe.yaml"))}
    generate, train = by_stage["generate"], by_stage["train"]
    assert generate.actors == 4 and generate.per_actor["GPU"] == 2.0  # the pool's max x TP 2
    assert generate.per_actor["accelerator_type:H100"] > 0
    assert train.total() == {"CPU": 32.0, "GPU": 8.0}
    # 4 replicas at most per model; the 30B teacher split over 2 GPUs; `base` (Qwen3-1.7B, the
    # student's starting model) needs an engine of its own
    assert by_stage["serve:teacher"].total() == {"GPU": 8.0}
    assert by_stage["serve:student"].total() == by_stage["serve:base"].total() == {"GPU": 4.0}


def test_cpu_demo_asks_only_for_cpus():
    for d in demands(load_config(CONFIGS / "demo_cpu.yaml")):
        assert set(d.per_actor) == {"CPU"}, d


def test_shortfalls_name_the_missing_resource_and_the_stage():
    engines = Demand("generate", "4 engines x TP 2", 4, {"GPU": 2.0})
    assert shortfalls(engines, {"GPU": 8.0}, [{"GPU": 8.0}]) == []
    missing = shortfalls(engines, {"GPU": 4.0}, [{"GPU": 4.0}])
    assert missing == ["generate needs 8 GPU in all (4 engines x TP 2); the cluster has 4"]
    # enough GPUs in all, but no node holds one engine's two packed GPUs
    scattered = shortfalls(engines, {"GPU": 8.0}, [{"GPU": 1.0}] * 8)
    assert len(scattered) == 1 and "no node has 2 GPU for one actor" in scattered[0]


def test_parquet_sources_are_counted_exactly_and_sampled_small(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raydistill.plan import SAMPLE_QUERIES, sample_queries

    pq.write_table(pa.table({"text": [f"hola {i}" for i in range(500)]}), tmp_path / "q.parquet")
    cfg = load_config(CONFIGS / "demo_cpu.yaml", [f"queries.train_path={tmp_path}", "teacher.max_rows=null"])
    texts, count, exact = sample_queries(cfg)
    assert (len(texts), count, exact) == (SAMPLE_QUERIES, 500, True) and texts[0] == "hola 0"
    capped = sample_queries(load_config(CONFIGS / "demo_cpu.yaml", [f"queries.train_path={tmp_path}"]))
    assert capped[1:] == (300, True)  # teacher.max_rows of the demo


def test_single_gpu_config_fits_one_gpu_per_stage():
    cfg = load_config(CONFIGS / "gpu_single.yaml")
    one_gpu = {"CPU": 16.0, "GPU": 1.0}
    for d in demands(cfg):
        assert shortfalls(d, one_gpu, [one_gpu]) == [], d  # each stage alone fits the one GPU
    serving = [d for d in demands(cfg) if d.stage.startswith("serve")]
    assert sum(d.total()["GPU"] for d in serving) == 1.0  # teacher and student share it


def test_a_shared_gpu_needs_unsplit_engines():
    import pytest

    from raydistill.errors import ConfigError

    with pytest.raises(ConfigError, match="gpus_per_replica < 1 shares one GPU"):
        load_config(CONFIGS / "gpu_single.yaml", ["serve.teacher_tensor_parallel_size=2"])


QWEN3_MOE = Path(__file__).parents[1] / "data" / "qwen3-30b-a3b-config"  # Qwen3-30B-A3B's shape: config.json only


def test_memory_fit_counts_a_moe_teacher_and_refuses_one_gpu_too_small():
    from raydistill.plan import memory_fits

    cfg = load_config(CONFIGS / "gpu_qwen3_moe.yaml", [f"teacher.model={QWEN3_MOE}"])
    teacher = [line for line in memory_fits(cfg) if "teacher" in line]
    assert len(teacher) == 2 and all("30.5B parameters" in line and "fits:" in line for line in teacher)  # TP 2 on H100s
    assert any("not checked: no local config.json for 'Qwen/Qwen3-1.7B'" in line for line in memory_fits(cfg))
    small = load_config(CONFIGS / "gpu_qwen3_moe.yaml", [f"teacher.model={QWEN3_MOE}", "teacher.tensor_parallel_size=1",
                                                         "teacher.accelerator_type=L4"])
    (generate,) = [line for line in memory_fits(small) if line.startswith("generate")]
    assert "61.1 GB weights" in generate and "DOES NOT FIT" in generate and "of 21.6 GB (L4)" in generate


def test_on_policy_engines_are_asked_for_beside_the_train_workers():
    cfg = load_config(CONFIGS / "gpu_single.yaml", ["train.on_policy.steps=10", "train.on_policy.rollout_engines=2",
                                                    "train.on_policy.rollout_resources={GPU: 1}"])
    by_stage = {d.stage: d for d in demands(cfg)}
    assert by_stage["train:rollout"].total() == {"GPU": 2.0}
    assert by_stage["train:scorer"].total() == {"CPU": 1.0}
    assert "train:rollout" not in {d.stage for d in demands(load_config(CONFIGS / "gpu_single.yaml"))}
