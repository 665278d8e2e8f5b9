"""Bad input through the real CLI: one-line error naming problem and fix, exit 2, no run dir.

Refusals that come before Ray starts call the CLI's ``main`` in this process (the console script
and ``python -m raydistill`` call the same function; a fresh interpreter per case cost ~10 s of
imports each); one case per failure family also runs as its own process, and every case that
starts Ray does.
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raydistill.cli import main

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def run_process(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raydistill", *args], capture_output=True, text=True, timeout=600,
                          cwd=REPO)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """``raydistill ARGS`` in this process: its exit code and what it printed."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(REPO), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess(["raydistill", *args], code, out.getvalue(), err.getvalue())


def config(tmp_path: Path, **overrides) -> Path:
    data = {"run_dir": str(tmp_path / "run"),
            "queries": {"train_path": str(tmp_path / "q.jsonl"), "eval_path": str(tmp_path / "q.jsonl")},
            "teacher": {"model": "builtin:smollm2-135m-instruct"}}
    for key, value in overrides.items():
        data[key] = value
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def assert_clean_failure(proc: subprocess.CompletedProcess, tmp_path: Path, *needles: str, ray_logs: bool = False) -> None:
    """``ray_logs``: the error surfaced inside Ray, whose own log lines (with the worker's
    traceback) precede ours; then our one-line error must be the last line."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("raydistill: error:")]
    assert len(error_lines) == 1, proc.stderr[-2000:]
    for needle in needles:
        assert needle in error_lines[0]
    if ray_logs:
        assert proc.stderr.strip().splitlines()[-1] == error_lines[0]
    else:
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("run", [run_cli, run_process], ids=["in-process", "process"])
def test_missing_config(tmp_path, run):
    proc = run("generate", str(tmp_path / "nope.yaml"))
    assert_clean_failure(proc, tmp_path, "not found", "pipeline YAML")


def test_malformed_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_dir: [oops\n")
    assert_clean_failure(run_cli("generate", str(bad)), tmp_path, "not valid YAML")


def test_unknown_key_and_bad_override(tmp_path):
    cfg = config(tmp_path, teacher={"modle": "x"})
    assert_clean_failure(run_cli("generate", str(cfg)), tmp_path, "unknown key 'teacher.modle'")
    cfg = config(tmp_path)
    assert_clean_failure(run_cli("train", str(cfg), "train.zero_stage=7"), tmp_path, "train.zero_stage")


@pytest.mark.parametrize("content,needle", [(None, "not found"), ("", "empty")])
def test_missing_or_empty_query_file(tmp_path, content, needle):
    if content is not None:
        (tmp_path / "q.jsonl").write_text(content)
    assert_clean_failure(run_cli("generate", str(config(tmp_path))), tmp_path, needle, "q.jsonl")


def test_unknown_model_path(tmp_path):
    (tmp_path / "q.jsonl").write_text('{"text": "hello"}\n')
    cfg = config(tmp_path, teacher={"model": str(tmp_path / "no-such-model")})
    assert_clean_failure(run_cli("generate", str(cfg)), tmp_path, "no-such-model", "config.json")
    cfg = config(tmp_path, teacher={"model": "not a model id"})
    assert_clean_failure(run_cli("generate", str(cfg)), tmp_path, "neither an existing folder nor an HF id")


def test_train_without_samples(tmp_path):
    assert_clean_failure(run_cli("train", str(config(tmp_path))), tmp_path, "raydistill generate")


def test_existing_output_is_refused_and_kept(tmp_path):
    (tmp_path / "q.jsonl").write_text('{"text": "hello"}\n')
    samples = tmp_path / "run" / "samples"
    samples.mkdir(parents=True)
    (samples / "part.parquet").write_bytes(b"keep me")
    proc = run_cli("generate", str(config(tmp_path)))
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    assert (samples / "part.parquet").read_bytes() == b"keep me"


@pytest.mark.parametrize(
    "name,content,needles",
    [
        ("q.csv", b"prompt,lang\nhello,en\n", ["no column 'text'", "queries.text_column"]),
        ("q.jsonl", b'{"text": "caf\xe9"}\n', ["not UTF-8", "re-encode"]),
        ("q.jsonl", b"not json\n", ["not JSON"]),
    ],
)
def test_bad_query_sources_fail_before_ray(tmp_path, name, content, needles):
    (tmp_path / name).write_bytes(content)
    cfg = config(tmp_path, queries={"train_path": str(tmp_path / name), "eval_path": str(tmp_path / name)})
    assert_clean_failure(run_cli("generate", str(cfg)), tmp_path, *needles)


def test_undecodable_bytes_deep_in_a_file(tmp_path, tiny_model):
    # Line 1 is fine, so this is caught in the Ray read, after the engines were asked for.
    (tmp_path / "q.txt").write_bytes(b"hello there\nbonjour\n" + b"caf\xe9 au lait\n" * 3)
    cfg = config(tmp_path, queries={"train_path": str(tmp_path / "q.txt"), "eval_path": str(tmp_path / "q.txt")},
                 teacher={"model": tiny_model, "dtype": "float32", "enforce_eager": True})
    assert_clean_failure(run_process("generate", str(cfg)), tmp_path, "not UTF-8", "q.txt", "re-encode", ray_logs=True)


def test_interrupted_output_needs_resume_or_overwrite(tmp_path):
    (tmp_path / "q.jsonl").write_text('{"text": "hello"}\n')
    partial = tmp_path / "run" / ".samples.partial"
    partial.mkdir(parents=True)
    (partial / "part.parquet").write_bytes(b"half")
    proc = run_cli("generate", str(config(tmp_path)))
    assert proc.returncode == 2 and "--resume" in proc.stderr and "interrupted" in proc.stderr
    assert (partial / "part.parquet").read_bytes() == b"half"


def write_samples(run: Path, *, valid: bool = True, rows: int = 8, prompt_sha256: str | None = None,
                  folder: str = "samples") -> Path:
    """A samples folder as `raydistill generate` writes it (the SAMPLES schema), by default from
    the default task's target prompt."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raydistill.config import TaskConfig
    from raydistill.schema import SAMPLES
    from raydistill.tasks.task import task_for

    prompt_sha256 = prompt_sha256 or task_for(TaskConfig()).prompt_sha256

    data: dict[str, list] = {name: [None] * rows for name in SAMPLES.names}
    data.update(id=[f"q{i}" for i in range(rows)], query=["hello there"] * rows, sample_index=[0] * rows,
                prompt_sha256=[prompt_sha256] * rows, teacher_model=["t"] * rows, response=[" English"] * rows,
                label=["en" if valid else None] * rows, valid=[valid] * rows,
                reject_reason=[None if valid else "no_label"] * rows)
    samples = run / folder
    samples.mkdir(parents=True)
    pq.write_table(pa.Table.from_pydict(data, schema=SAMPLES), samples / "part-0.parquet")
    return samples


@pytest.mark.parametrize(
    "case,train,needles",
    [
        ("no_valid_rows", {}, ["no valid rows", "teacher prompt"]),
        ("wrong_schema", {}, ["missing column(s)", "'valid'", "raydistill generate"]),
        ("missing_lora_target", {"lora_target_modules": ["q_proj", "nope_proj"]}, ["['nope_proj'] not found", "all-linear"]),
        ("longer_than_context", {"max_seq_len": 100_000}, ["longer than the student's context (2048", "lower train.max_seq_len"]),
        ("unusable_mlflow_store", {"tracking": "mlflow", "mlflow_tracking_uri": "nosuch://tracking"},
         ["train.mlflow_tracking_uri=nosuch://tracking is not usable", "train.tracking=none"]),
        ("changed_prompt", {}, ["another target prompt", "(sha256 0123456789abcdef)", "allow_prompt_change=true"]),
    ],
)
def test_bad_training_input_fails_before_training(tmp_path, tiny_model, case, train, needles):
    run = tmp_path / "run"
    if case == "wrong_schema":  # e.g. a query file copied where the samples belong
        import pyarrow as pa
        import pyarrow.parquet as pq

        (run / "samples").mkdir(parents=True)
        pq.write_table(pa.table({"id": ["a"], "text": ["hello"]}), run / "samples" / "part-0.parquet")
    else:
        write_samples(run, valid=case != "no_valid_rows",
                      prompt_sha256="0123456789abcdef" * 4 if case == "changed_prompt" else None)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    cfg = config(tmp_path, train={"student_model": tiny_model, **train})
    proc = (run_process if case == "no_valid_rows" else run_cli)("train", str(cfg))  # one as its own process
    assert proc.returncode == 2, proc.stderr[-2000:]
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("raydistill: error:")]
    assert len(error_lines) == 1, proc.stderr[-2000:]
    for needle in needles:
        assert needle in error_lines[0], error_lines[0]
    assert "Traceback" not in proc.stderr
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # no student, no checkpoints, samples kept


def test_resuming_with_another_target_prompt_is_refused_and_the_run_kept(tmp_path):
    (tmp_path / "q.jsonl").write_text('{"text": "hola"}\n')
    partial = write_samples(tmp_path / "run", prompt_sha256="0123456789abcdef" * 4, folder=".samples.partial")
    before = sorted(partial.iterdir())
    proc = run_cli("generate", str(config(tmp_path)), "--resume")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "interrupted run" in proc.stderr and "(sha256 0123456789abcdef)" in proc.stderr and "allow_prompt_change" in proc.stderr
    assert sorted(partial.iterdir()) == before  # the interrupted run is kept for a --resume with its own prompt


def test_a_task_whose_queries_are_missing_is_named(tmp_path):
    (tmp_path / "q.jsonl").write_text('{"text": "hola"}\n')
    good = {"train_path": str(tmp_path / "q.jsonl"), "eval_path": str(tmp_path / "q.jsonl")}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "tasks": [
        {"tag": "a", "name": "langid", "queries": good},
        {"tag": "b", "name": "langid", "queries": {**good, "train_path": str(tmp_path / "missing.jsonl")}}]}))
    assert_clean_failure(run_cli("generate", str(path)), tmp_path, "task 'b'", "missing.jsonl", "not found")


@pytest.mark.parametrize(
    "task,needles",
    [
        ({"name": "t", "answer": "free", "system_prompt_file": "missing.txt"},
         ["system_prompt_file", "missing.txt", "not found", "fix system_prompt_file"]),
        ({"name": "t", "answer": "free", "labels": {"a": "A"}}, ["free task has no labels", "labels", "answer: labelled"]),
        ({"name": "t", "answer": "essay"}, ["'answer'", "'labelled' or 'free'", "fix the task file"]),
        ({"name": "t"}, ["labelled task needs labels", "answer: free"]),
    ],
    ids=["missing-prompt-file", "labels-on-a-free-task", "unknown-answer-kind", "labelled-without-labels"],
)
def test_bad_task_files_fail_before_any_work(tmp_path, task, needles):
    (tmp_path / "q.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(task))
    cfg = config(tmp_path, task={"name": str(tmp_path / "task.yaml")})
    for stage in ("generate", "run"):
        assert_clean_failure(run_cli(stage, str(cfg)), tmp_path, *needles)
