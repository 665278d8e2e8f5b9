"""Exactly-once generate: the Parquet files already written are the ledger of finished work.

A Parquet file is readable only once its footer is written, which is the last thing a writer
does; a file torn by a crash (SIGKILL, lost node) has no footer. So on resume every readable
file in the partial output holds whole, finished samples, every unreadable one is deleted,
and only the (query id, sample index) pairs missing from the readable files are sampled again.

Why not Ray Data's ``CheckpointConfig``: it keys by one id column that must exist at the Read
operator (our ids are hashed from text after reading), it filters whole queries (with k
samples per query a crash can split a query across two files, which would lose samples), and
its filter actor needs a spare CPU (it hung on a 2-CPU cluster here).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from raydistill.teacher.requests import sample_key

logger = logging.getLogger(__name__)


def finished_samples(folder: str | Path) -> tuple[np.ndarray, int]:
    """Sorted unique keys of the samples in the readable Parquet files of ``folder``, and the
    number of torn files deleted."""
    keys: list[str] = []
    torn = 0
    for path in sorted(Path(folder).glob("*.parquet")):
        try:
            table = pq.read_table(path, columns=["id", "sample_index"])
        except Exception as exc:  # no footer / truncated: written when the run died
            logger.warning("resume: deleting torn file %s (%s)", path.name, exc)
            path.unlink()
            torn += 1
            continue
        keys.extend(sample_key(i, k) for i, k in zip(table["id"].to_pylist(), table["sample_index"].to_pylist()))
    return np.array(sorted(set(keys)), dtype=object), torn
