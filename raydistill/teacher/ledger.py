"""Exactly-once generate: the Parquet files already written are the ledger of finished work.

A Parquet file is readable only once its footer is written, which is the last thing a writer
does; a file torn by a crash (SIGKILL, lost node) has no footer. So on resume every readable
file in the partial output holds whole, finished samples, every unreadable one is deleted,
and only the (query id, sample index) pairs missing from the readable files are sampled again.

The finished keys are held as a sorted array of their 64-bit hashes (``requests.sample_hash``),
8 bytes a sample: 80 MB at 10^7 samples, 800 MB at 10^8 (measured in ``bench/scale_bench.py``;
a ``str`` key took ~70 bytes plus an 8-byte pointer). The files are hashed by Ray tasks and
the array is merged by one task into the object store, so the driver holds only a reference
and each request actor reads it zero-copy. The price is a false "done": a sample still to do
whose hash equals a finished one's is skipped. With n finished and m missing samples that
happens with probability about n*m/2^64: 5e-6 at n = m = 10^7, 5e-4 at 10^8 (one lost sample
in ~2,000 resumes of that size), which we accept; exact keys would cost ~10x the memory.

Why not Ray Data's ``CheckpointConfig``: it keys by one id column that must exist at the Read
operator (our ids are hashed from text after reading), it filters whole queries (with k
samples per query a crash can split a query across two files, which would lose samples), and
its filter actor needs a spare CPU (it hung on a 2-CPU cluster here).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from raydistill.schema import parquet_files
from raydistill.storage import Location, location
from raydistill.teacher.requests import sample_hash, sample_key

logger = logging.getLogger(__name__)


def file_sample_hashes(path: str | Path | Location) -> np.ndarray | None:
    """The sample hashes of one Parquet file of samples (unsorted), or None for a torn file
    (on an object store a file is all there or absent: only a local or mounted folder tears)."""
    loc = location(path)
    try:
        table = pq.read_table(loc.path, columns=["id", "sample_index"], filesystem=loc.fs)
    except Exception as exc:  # no footer / truncated: written when the run died
        logger.warning("resume: torn file %s (%s)", loc.name, exc)
        return None
    ids, ks = table["id"].to_pylist(), table["sample_index"].to_pylist()
    return np.fromiter((sample_hash(sample_key(i, k)) for i, k in zip(ids, ks)), dtype=np.uint64, count=len(ids))


def merge_hashes(*parts: np.ndarray) -> np.ndarray:
    """One sorted array of the distinct hashes of all parts (``requests.is_done`` searches it)."""
    return np.unique(np.concatenate(parts)) if parts else np.array([], dtype=np.uint64)


def finished_samples(folder: str | Path | Location) -> tuple[np.ndarray, int]:
    """In this process: the sorted sample hashes of the readable Parquet files of ``folder``, and
    the number of torn files deleted. ``put_finished_samples`` does the same in Ray."""
    parts, torn = [], 0
    for uri in parquet_files(folder):
        hashes = file_sample_hashes(uri)
        if hashes is None:
            location(uri).delete()
            torn += 1
        else:
            parts.append(hashes)
    return merge_hashes(*parts), torn


def _finished_in_ray(paths: list[str]) -> tuple[np.ndarray, int, list[str]]:
    """A Ray task: each file hashed by a task of its own, merged here. Small results of tasks are
    held by the process that started them, so this task, not the driver, collects them."""
    import ray

    per_file: Any = ray.remote(num_cpus=0.5)(file_sample_hashes)
    parts = ray.get([per_file.remote(p) for p in paths])
    torn = [p for p, hashes in zip(paths, parts) if hashes is None]
    merged = merge_hashes(*(hashes for hashes in parts if hashes is not None))
    return merged, len(merged), torn


def put_finished_samples(folder: str | Path | Location) -> tuple[Any, int, int]:
    """``finished_samples`` done by Ray tasks, the sorted array left in the object store:
    (its object ref, or None when nothing is finished; samples; torn files deleted). The driver
    never holds the keys, so its memory does not grow with the output."""
    import ray

    paths = parquet_files(folder)
    if not paths:
        return None, 0, 0
    task: Any = ray.remote(num_cpus=0, num_returns=3)(_finished_in_ray)
    done_ref, n_ref, torn_ref = task.remote(paths)
    n, torn = ray.get([n_ref, torn_ref])
    for path in torn:
        logger.warning("resume: deleting torn file %s", location(path).name)
        location(path).delete()
    return (done_ref if n else None), int(n), len(torn)
