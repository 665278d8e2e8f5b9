"""Reading queries: any of jsonl / json / parquet / csv / txt, as a Ray Dataset (never on the driver).

The pure part, ``normalize_batch``, maps a user's columns to the QUERIES schema and gives every
row a stable id (the given one, or a hash of the text).
"""

from __future__ import annotations

import glob
import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from raydistill.errors import DataError
from raydistill.schema import QUERIES

if TYPE_CHECKING:
    import ray.data

BUILTIN_PREFIX = "builtin:"
_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


def text_id(text: str) -> str:
    """A stable query id from its text (first 16 hex digits of sha256)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def normalize_batch(
    batch: pa.Table, *, text_column: str, id_column: str | None, gold_column: str | None, source: str
) -> pa.Table:
    """User columns → QUERIES schema. Rows with empty text are dropped (nothing to ask)."""
    if text_column not in batch.column_names:
        raise DataError(
            f"query source {source!r} has no column {text_column!r} (columns: {batch.column_names}); "
            f"set queries.text_column to the column holding the query text"
        )
    texts = [t if isinstance(t, str) else ("" if t is None else str(t)) for t in batch.column(text_column).to_pylist()]
    if id_column and id_column in batch.column_names:
        ids = [str(i) if i is not None else text_id(t) for i, t in zip(batch.column(id_column).to_pylist(), texts)]
    else:
        ids = [text_id(t) for t in texts]
    if gold_column and gold_column in batch.column_names:
        golds = [None if g is None else str(g) for g in batch.column(gold_column).to_pylist()]
    else:
        golds = [None] * len(texts)
    keep = [i for i, t in enumerate(texts) if t.strip()]
    return pa.table(
        {
            "id": [ids[i] for i in keep],
            "text": [texts[i] for i in keep],
            "gold": [golds[i] for i in keep],
            "source": [source] * len(keep),
        },
        schema=QUERIES,
    )


def resolve_local_files(path: str) -> list[str]:
    """Expand a local file, directory or glob to the files it names; errors say what to fix."""
    if path.startswith(BUILTIN_PREFIX):
        from raydistill.data.builtin import builtin_queries_path

        path = builtin_queries_path(path[len(BUILTIN_PREFIX) :])
    if any(ch in path for ch in "*?["):
        files = sorted(glob.glob(path))
    elif os.path.isdir(path):
        files = sorted(str(p) for p in Path(path).rglob("*") if p.is_file() and p.suffix in _FORMATS)
    elif os.path.isfile(path):
        files = [path]
    else:
        raise DataError(f"query file {path!r} not found; check queries.train_path / queries.eval_path")
    if not files:
        raise DataError(f"no query files (.jsonl .json .parquet .csv .txt) under {path!r}; point the path at your queries")
    formats = {_FORMATS.get(Path(f).suffix) for f in files}
    if None in formats:
        bad = next(f for f in files if Path(f).suffix not in _FORMATS)
        raise DataError(f"query file {bad!r} has an unknown extension; use .jsonl, .json, .parquet, .csv or .txt")
    if len(formats) > 1:
        raise DataError(f"query path {path!r} mixes formats {sorted(formats)}; keep one format per path")
    if all(os.path.getsize(f) == 0 for f in files):
        raise DataError(f"query file(s) under {path!r} are empty; add one query per row/line")
    return files


def read_queries(
    path: str, *, text_column: str = "text", id_column: str | None = "id", gold_column: str | None = "gold"
) -> ray.data.Dataset:
    """A lazy Ray Dataset of queries in the QUERIES schema."""
    import ray.data

    files = resolve_local_files(path)
    fmt = _FORMATS[Path(files[0]).suffix]
    readers: dict[str, Any] = {
        "json": lambda: ray.data.read_json(files, lines=True) if files[0].endswith(".jsonl") else ray.data.read_json(files),
        "parquet": lambda: ray.data.read_parquet(files),
        "csv": lambda: ray.data.read_csv(files),
        "text": lambda: ray.data.read_text(files, drop_empty_lines=True),
    }
    ds = readers[fmt]()
    if fmt == "text":
        text_column, id_column, gold_column = "text", None, None
    return ds.map_batches(
        normalize_batch,
        batch_format="pyarrow",
        fn_kwargs={"text_column": text_column, "id_column": id_column, "gold_column": gold_column, "source": path},
    )
