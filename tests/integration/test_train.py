"""`raydistill train` under faults, on real Ray Train + DeepSpeed ZeRO-2 + PEFT (SmolLM2-135M):
a worker killed mid-run is restarted from the last checkpoint (FailureConfig), and after the
driver is killed the same command with --resume continues from the last checkpoint.

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
STEPS, EVERY = 12, 3


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


@pytest.fixture(scope="module")
def faulted_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train-faults")
    run = tmp / "run"
    write_samples(run / "samples", 160)
    config = {
        "run_dir": str(run),
        "queries": {"train_path": "builtin:langid-demo/train", "eval_path": "builtin:langid-demo/eval"},
        "train": {"num_workers": 2, "zero_stage": 2, "lora_rank": 8, "lora_target_modules": ["q_proj", "v_proj"],
                  "batch_size_per_worker": 2, "max_steps": STEPS, "checkpoint_every": EVERY, "log_every": 1,
                  "eval_every": 6, "val_fraction": 0.1, "max_failures": 2, "max_seq_len": 128, "learning_rate": 1e-3},
        "cluster": {"num_cpus": 4},
    }
    cfg = tmp / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
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
        wait_for(lambda: checkpoint_steps(run) and checkpoint_steps(run)[-1] > first, driver, log1, 600,
                 "a checkpoint after the worker restart")
    finally:
        kill_session(driver)
    seen = checkpoint_steps(run)
    assert not (run / "student").exists()

    refused = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    proc = subprocess.run([*cmd, "--resume"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return {"run": run, "log1": log1.read_text(), "log2": proc.stdout + proc.stderr, "first": first, "seen": seen, "refused": refused}


def test_killed_worker_is_restarted_from_the_last_checkpoint(faulted_run):
    assert f"resumed from the checkpoint at step {faulted_run['first']}" in faulted_run["log1"]


def test_killed_driver_continues_with_resume(faulted_run):
    refused = faulted_run["refused"]
    assert refused.returncode == 2 and "--resume" in refused.stderr and "interrupted run" in refused.stderr
    resumed = [int(m) for m in re.findall(r"resumed from the checkpoint at step (\d+)", faulted_run["log2"])]
    # the last checkpoint Ray Train had committed when the driver died (one being written may not count)
    assert len(resumed) == 1 and resumed[0] in faulted_run["seen"] and resumed[0] > faulted_run["first"]
    student = faulted_run["run"] / "student"
    manifest = json.loads((student / "_manifest.json").read_text())
    assert manifest["counts"]["steps"] == STEPS
    assert manifest["counts"]["resumed_from_step"] == resumed[0]
    rows = [json.loads(line) for line in (student / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # history carried across both restarts
    assert [r["step"] for r in rows if r.get("eval_loss") is not None] == [6, 12]
    assert manifest["counts"]["validation_examples"] > 0
    assert (student / "loss_curve.png").stat().st_size > 0
    assert (student / "adapter" / "adapter_model.safetensors").is_file()
    assert (student / "merged" / "model.safetensors").is_file()
