"""The Parquet contract of every artifact, in one place.

Stages check the columns they read with ``require_columns`` and fail with an error that names
what is missing, before any expensive work starts. Each Ray Data UDF declares the columns it
reads (a ``*_COLUMNS`` tuple next to it) and checks every batch with ``check_batch``, so a
pipeline wired to the wrong input fails naming the column, not with a KeyError inside a worker.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa

from raydistill.errors import DataError
from raydistill.storage import Location, location

QUERIES = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("gold", pa.string()),
        pa.field("source", pa.string()),
    ]
)

SAMPLES = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("task", pa.string()),  # the task's tag (several tasks) or name (one)
        pa.field("query", pa.string(), nullable=False),
        pa.field("gold", pa.string()),
        pa.field("sample_index", pa.int32(), nullable=False),
        pa.field("prompt_sha256", pa.string(), nullable=False),
        pa.field("teacher_model", pa.string(), nullable=False),
        pa.field("response", pa.string()),
        pa.field("label", pa.string()),
        pa.field("valid", pa.bool_(), nullable=False),
        pa.field("reject_reason", pa.string()),
        pa.field("num_input_tokens", pa.int32()),
        pa.field("num_output_tokens", pa.int32()),
        # With teacher.logprobs = k > 0 (null otherwise), per generated token: its id, its
        # logprob, and the teacher's top-k alternatives (ids and logprobs, best first). Plain
        # numeric lists, so any Parquet reader (pandas, polars, DuckDB) reads them.
        pa.field("token_ids", pa.list_(pa.int32())),
        pa.field("token_logprobs", pa.list_(pa.float32())),
        pa.field("top_token_ids", pa.list_(pa.list_(pa.int32()))),
        pa.field("top_logprobs", pa.list_(pa.list_(pa.float32()))),
    ]
)

EVAL_RESULTS = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("task", pa.string()),
        pa.field("query", pa.string(), nullable=False),
        pa.field("gold", pa.string()),
        pa.field("system", pa.string(), nullable=False),
        pa.field("answer", pa.string()),
        pa.field("label", pa.string()),
        pa.field("valid", pa.bool_(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("latency_s", pa.float64()),
        pa.field("started_at", pa.float64()),  # wall clock (epoch s) when the request was sent
        pa.field("num_input_tokens", pa.int32()),
        pa.field("num_output_tokens", pa.int32()),
    ]
)


def optional_text(value: Any) -> str | None:
    """A nullable string cell as a Ray Data numpy batch holds it: a column that is null in a whole
    block arrives as float NaN, not None, and must not become the text "nan"."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    return str(value)


def require_columns(available: Iterable[str], needed: pa.Schema | Iterable[str], what: str, fix: str) -> None:
    """Raise DataError naming every column of ``needed`` (a schema or names) missing from ``available``."""
    have = set(available)
    names = needed.names if isinstance(needed, pa.Schema) else list(needed)
    missing = [name for name in names if name not in have]
    if missing:
        raise DataError(f"{what} is missing column(s) {missing}; {fix}")


def check_batch(batch: Mapping[str, Any], needed: Iterable[str], udf: str) -> None:
    """A Ray Data UDF's input contract: raise DataError naming the columns ``udf`` reads that
    ``batch`` lacks, and the columns it has (the usual cause is a stage wired to the wrong input)."""
    require_columns(batch.keys(), needed, f"the input of {udf} (columns {sorted(batch.keys())})",
                    "it reads only the columns named; check the stage that produced it")


def parquet_files(folder: str | Path | Location) -> list[str]:
    """The Parquet files of an artifact folder (which also holds _manifest.json), local paths or
    URIs as the folder is: what Ray Data, pyarrow and every node can open."""
    loc = location(folder)
    return [loc.child_uri(f.path) for f in loc.list(".parquet")]
