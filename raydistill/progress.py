"""Quiet by default: one progress line per stage every few seconds (done / total, rate, ETA),
with Ray's and the engines' own logs kept in files. ``raydistill -v`` shows everything."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from raydistill.errors import RaydistillError
from raydistill.storage import Location, location

logger = logging.getLogger("raydistill.progress")

VERBOSE_ENV = "RAYDISTILL_VERBOSE"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


class ParquetRows:
    """Rows in the finished Parquet files under a folder of run storage, local or remote: each
    file's footer is read once (written files never change), so a tick costs one listing."""

    def __init__(self, folder: str | Path | Location):
        self.folder = location(folder)
        self.seen: dict[str, int] = {}

    def __call__(self) -> int:
        import pyarrow.parquet as pq

        try:
            files = self.folder.list(".parquet", recursive=True)
        except RaydistillError:  # a progress line must not fail the stage; the stage's own reads report it
            files = []
        for info in files:
            if info.path not in self.seen:
                try:
                    self.seen[info.path] = pq.read_metadata(info.path, filesystem=self.folder.fs).num_rows
                except (OSError, ValueError):  # no footer yet
                    continue
        return sum(self.seen.values())


def parquet_rows(folder: str | Path | Location) -> int:
    """Rows in the finished Parquet files under ``folder`` (a file still being written is skipped)."""
    return ParquetRows(folder)()


def last_step(metrics_jsonl: str | Path | Location) -> int:
    """The last training step logged to ``metrics.jsonl`` (0 before the first)."""
    try:
        lines = location(metrics_jsonl).read_text().splitlines()
    except (OSError, RaydistillError):
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0


def format_line(label: str, done: int, total: int | None, unit: str, elapsed_s: float, rate: float | None = None) -> str:
    """``generate: 96/300 samples · 1.60/s · ETA 2m08s · 1m00s elapsed`` (pure). ``rate``: the
    steady rate when known (start-up excluded), else the average since the start."""
    head = f"{label}: {done:,}/{total:,} {unit}" if total else f"{label}: {done:,} {unit}"
    if done == 0:  # engines and workers still loading: "0.00/s" would read as stuck
        return f"{head} · starting up, none finished yet · {duration(elapsed_s)} elapsed"
    if rate is None:
        rate = done / elapsed_s if elapsed_s > 0 else 0.0
    parts = [head, f"{rate:.2f}/s"]
    if total and rate > 0 and done < total:
        parts.append(f"ETA {duration((total - done) / rate)}")
    parts.append(f"{duration(elapsed_s)} elapsed")
    return " · ".join(parts)


def duration(seconds: float) -> str:
    """``45s``, ``2m08s``, ``3h05m``."""
    hours, rest = divmod(int(round(seconds)), 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """A background thread logging ``format_line`` every ``every_s`` while a stage works (the
    stage logs its own summary when it ends). ``count`` must be cheap and must not raise."""

    def __init__(self, label: str, count: Callable[[], int], total: int | None, unit: str, every_s: float = 15.0):
        self.label, self.count, self.total, self.unit, self.every_s = label, count, total, unit, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"progress-{label}", daemon=True)
        self._started = 0.0

    def __enter__(self) -> Progress:
        self._started = time.time()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        first: tuple[float, int] | None = None  # when work first showed: the rate leaves start-up out
        while not self._stop.wait(self.every_s):
            now, done = time.time(), self.count()
            if first is None and done > 0:
                first = (now, done)
            rate = (done - first[1]) / (now - first[0]) if first and done > first[1] else None
            logger.info(format_line(self.label, done, self.total, self.unit, now - self._started, rate))


def quiet_ray_driver() -> None:
    """After ray.init: Ray Data's operator dumps off (stages log their own progress), its 'progress
    bars disabled' notice dropped. Everything Ray logs still goes to its session log files."""
    if verbose():
        return
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    for name in ("ray", "ray.data", "ray.serve", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)
    quiet_driver_notices()


# Notices a user of the demo cannot act on, by the logger that writes them. Levels are set on
# these loggers themselves: each ray.init (Ray Data LLM calls it again) resets the "ray" logger.
DRIVER_NOTICES = {
    "ray.data._internal.progress": logging.ERROR,  # "progress bars disabled": what we asked for
    "ray._private.worker": logging.WARNING,  # "Connecting to existing Ray cluster", "Calling ray.init() again"
    "ray._private.authentication": logging.ERROR,  # token auth on a cluster we started on loopback
    "ray.llm": logging.WARNING,  # "No cloud storage mirror configured"
    "vllm.triton_utils": logging.ERROR,  # Triton has no CPU backend (and GPUs do not need telling)
}


def quiet_driver_notices() -> None:
    """Drop DRIVER_NOTICES from the terminal (``-v`` keeps them); called before and after ray.init."""
    if verbose():
        return
    for name, level in DRIVER_NOTICES.items():
        logging.getLogger(name).setLevel(level)
    # Ray LLM gives each of its module loggers a console handler at INFO of its own, unless the
    # "ray.llm" logger has a handler: with one there, its records keep to the level set above.
    llm = logging.getLogger("ray.llm")
    if not llm.handlers:
        llm.addHandler(logging.NullHandler())
