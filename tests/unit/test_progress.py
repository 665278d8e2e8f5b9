"""The stages' progress lines: what they count and how they read."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydistill.progress import duration, format_line, last_step, parquet_rows


def test_line_shows_done_total_rate_and_eta():
    assert format_line("generate", 96, 300, "samples", 60.0) == "generate: 96/300 samples · 1.60/s · ETA 2m08s · 1m00s elapsed"
    assert format_line("generate", 300, 300, "samples", 150.0) == "generate: 300/300 samples · 2.00/s · 2m30s elapsed"
    assert format_line("generate", 5, None, "samples", 10.0) == "generate: 5 samples · 0.50/s · 10s elapsed"
    assert format_line("train", 0, 17, "steps", 30.0) == "train: 0/17 steps · starting up, none finished yet · 30s elapsed"
    # the steady rate, start-up left out, sets the ETA
    assert format_line("generate", 128, 300, "samples", 150.0, rate=4.0) == \
        "generate: 128/300 samples · 4.00/s · ETA 43s · 2m30s elapsed"


def test_parquet_rows_counts_finished_files_only(tmp_path):
    pq.write_table(pa.table({"x": list(range(64))}), tmp_path / "a.parquet")
    (tmp_path / "sub").mkdir()
    pq.write_table(pa.table({"x": list(range(10))}), tmp_path / "sub" / "b.parquet")
    (tmp_path / "c.parquet").write_bytes(b"PAR1 still being written")
    assert parquet_rows(tmp_path) == 74
    assert parquet_rows(tmp_path / "missing") == 0


def test_last_step_reads_the_newest_logged_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert last_step(path) == 0
    path.write_text("\n".join(json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3)) + '\n{"step": 4, "lo')
    assert last_step(path) == 3  # a line being appended is skipped


def test_durations_read_at_a_glance():
    assert [duration(s) for s in (45, 128, 11_100)] == ["45s", "2m08s", "3h05m"]



@pytest.fixture
def notice_loggers():
    """DRIVER_NOTICES' loggers at NOTSET for the test, their levels put back after it."""
    import logging

    from raydistill.progress import DRIVER_NOTICES

    saved = {name: logging.getLogger(name).level for name in DRIVER_NOTICES}
    llm_handlers = list(logging.getLogger("ray.llm").handlers)
    for name in saved:
        logging.getLogger(name).setLevel(logging.NOTSET)
    yield
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)
    logging.getLogger("ray.llm").handlers = llm_handlers


@pytest.mark.parametrize("verbose", ["", "1"])
def test_driver_notices_are_dropped_unless_verbose(monkeypatch, notice_loggers, verbose):
    import logging

    from raydistill.progress import DRIVER_NOTICES, VERBOSE_ENV, quiet_driver_notices

    monkeypatch.setenv(VERBOSE_ENV, verbose)
    root_level = logging.getLogger().level
    logging.getLogger().setLevel(logging.DEBUG)
    try:
        quiet_driver_notices()
        # a record from below the named logger (the module that writes the notice) is what counts
        token = logging.getLogger("ray._private.authentication.authentication_token_setup")
        worker = logging.getLogger("ray._private.worker")
        from ray.llm._internal.common.observability.logging import get_logger

        llm = get_logger(f"raydistill.test.notices{verbose}")  # as a Ray LLM module does at import
        if verbose:
            assert all(logging.getLogger(name).level == logging.NOTSET for name in DRIVER_NOTICES)
        else:
            assert not token.isEnabledFor(logging.WARNING) and not worker.isEnabledFor(logging.INFO)
            assert not llm.isEnabledFor(logging.INFO) and not llm.handlers  # "No cloud storage mirror configured"
            assert worker.isEnabledFor(logging.WARNING)  # real warnings still show
    finally:
        logging.getLogger().setLevel(root_level)
