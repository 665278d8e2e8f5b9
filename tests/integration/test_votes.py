"""`teacher.votes` on a real local Ray: training keeps one example per query, its majority label,
with the votes spread over several files (so over several blocks, met again by the hash shuffle),
and `train.min_confidence` drops the queries whose majority was narrow."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydistill.config import ClusterConfig, PipelineConfig
from raydistill.errors import ConfigError
from raydistill.runtime import init_ray
from raydistill.schema import SAMPLES
from raydistill.storage import location
from raydistill.student.train import example_datasets
from raydistill.tasks.pipeline_tasks import run_tasks, specs_by_key

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
TOKENIZER = str(REPO / "tests" / "data" / "smollm2-tokenizer")
VOTES = {"q0": ["en", "en", "en"], "q1": ["de", "fr", "de"], "q2": ["es", "fr", None], "q3": [None, None, None]}


@pytest.fixture(scope="module")
def ray_local():
    import ray

    init_ray(ClusterConfig(num_cpus=2))
    yield
    ray.shutdown()


def write_votes(folder: Path, task) -> None:
    folder.mkdir(parents=True)
    for k in range(3):  # a file per vote: a query's votes are in three blocks
        rows = [{"id": qid, "task": task.name, "query": f"text of {qid}", "gold": None, "sample_index": k,
                 "prompt_sha256": task.prompt_sha256, "teacher_model": "hand-made",
                 "response": f" {task.labels[labels[k]]}." if labels[k] else " no idea", "label": labels[k],
                 "valid": labels[k] is not None, "reject_reason": None if labels[k] else "no_label_found",
                 "num_input_tokens": 50, "num_output_tokens": 3, "token_ids": None, "token_logprobs": None,
                 "top_token_ids": None, "top_logprobs": None} for qid, labels in VOTES.items()]
        pq.write_table(pa.Table.from_pylist(rows, schema=SAMPLES), folder / f"part-{k}.parquet")


def config(tmp_path: Path, min_confidence: float) -> PipelineConfig:
    return PipelineConfig.model_validate({
        "run_dir": str(tmp_path), "task": {"name": "langid"},
        "queries": {"train_path": "x.jsonl", "eval_path": "x.jsonl"},
        "teacher": {"votes": 3, "temperature": 0.7},
        "train": {"min_confidence": min_confidence, "val_fraction": 0.0, "target": "label"}})


def test_each_query_is_learned_once_with_its_majority_label(tmp_path, ray_local):
    """One Ray Data run (each costs minutes on a loaded 2-core host): the 0.6 bar keeps q1's 2/3
    majority and drops q2's 1/3 one; the tie-break and the 0.0 bar are unit-tested on the pure parts."""
    cfg, kept = config(tmp_path, 0.6), {"q0": "English", "q1": "German"}
    tasks = run_tasks(cfg)
    write_votes(tmp_path / "samples", tasks[0].spec)
    train_ds, _, n_examples, n_val, votes = example_datasets(cfg, location(tmp_path / "samples"), TOKENIZER,
                                                             specs_by_key(tasks))
    assert n_val == 0 and n_examples == len(kept)
    assert votes["queries"] == 4 and votes["unanimous"] == 1 and votes["kept"] == len(kept)
    assert votes["mean_confidence"] == pytest.approx((1 + 2 / 3 + 1 / 3 + 0) / 4, abs=1e-4)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    learned = {}
    for row in train_ds.take_all():
        answer = [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != -100]
        learned[row["id"]] = tokenizer.decode(answer).replace("<|im_end|>", "").strip()
    assert learned == kept


def test_votes_are_refused_for_free_tasks_and_greedy_teachers(tmp_path):
    (tmp_path / "free.yaml").write_text("name: f\nanswer: free\nsystem_prompt: Be kind.\n")
    cfg = PipelineConfig.model_validate({
        "run_dir": str(tmp_path), "task": {"name": str(tmp_path / "free.yaml")},
        "queries": {"train_path": "x.jsonl", "eval_path": "x.jsonl"}, "teacher": {"votes": 3, "temperature": 0.7}})
    with pytest.raises(ConfigError, match="free-form"):
        run_tasks(cfg)
    with pytest.raises(ValueError, match="temperature > 0"):
        PipelineConfig.model_validate({"run_dir": "r", "queries": {"train_path": "x", "eval_path": "x"},
                                       "teacher": {"votes": 3}})
