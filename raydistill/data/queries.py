"""Reading queries: jsonl / json / parquet / csv / txt from any source, as a Ray Dataset (never on the driver).

The pure part, ``normalize_batch``, maps a user's columns to the QUERIES schema and gives every
row a stable id (the given one, or a hash of the text).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from raydistill.config import QueriesConfig
from raydistill.data.sources import Source, check_columns, resolve_source
from raydistill.errors import DataError
from raydistill.ids import text_id
from raydistill.schema import QUERIES

if TYPE_CHECKING:
    import ray.data

    from raydistill.tasks.pipeline_tasks import RunTask


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


def csv_column_types(cfg: QueriesConfig):
    """CSV cells are read as text in the query columns: type inference would make ids such as
    ``00123`` integers (their zeros lost) or give two files of one source different types."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    columns = [c for c in (cfg.text_column, cfg.id_column, cfg.gold_column) if c]
    return pacsv.ConvertOptions(column_types=dict.fromkeys(columns, pa.string()))


def read_queries(source: Source, cfg: QueriesConfig) -> ray.data.Dataset:
    """A lazy Ray Dataset of queries in the QUERIES schema (optionally de-duplicated by id)."""
    import ray.data

    kwargs: dict[str, Any] = {"filesystem": source.filesystem}
    files = list(source.files)
    readers: dict[str, Callable[[], ray.data.Dataset]] = {
        # pyarrow's JSON reader (lines=False) reads JSON Lines and takes a filesystem.
        "jsonl": lambda: ray.data.read_json(files, **kwargs),
        "json": lambda: ray.data.read_json(files, **kwargs),
        "parquet": lambda: ray.data.read_parquet(files, **kwargs),
        "csv": lambda: ray.data.read_csv(files, convert_options=csv_column_types(cfg), **kwargs),
        "text": lambda: ray.data.read_text(files, drop_empty_lines=True, **kwargs),
    }
    ds: ray.data.Dataset
    if source.on_driver and source.format == "jsonl":
        import pyarrow.json as pajson

        ds = ray.data.from_arrow([pajson.read_json(f) for f in files])
    else:
        ds = readers[source.format]()
    text_column, id_column, gold_column = cfg.text_column, cfg.id_column, cfg.gold_column
    if source.format == "text":
        text_column, id_column, gold_column = "text", None, None
    ds = ds.map_batches(
        normalize_batch,  # type: ignore[arg-type]  # Ray's UDF type has no keyword-only params; fn_kwargs fills them
        batch_format="pyarrow",
        fn_kwargs={"text_column": text_column, "id_column": id_column, "gold_column": gold_column, "source": source.uri},
    )
    return dedup_by_id(ds) if cfg.dedup else ds


def dedup_by_id(ds: ray.data.Dataset) -> ray.data.Dataset:
    """One row per id: the one all-to-all step of generate, so it is opt-in.

    A hash shuffle on ``id`` puts every row of an id in the same output block, and each block
    then drops its repeats in one vectorized pass. ``groupby("id").map_groups`` does the same
    shuffle but calls Python once per id, which cost ~0.1 ms a row (125 s at 10^6 rows on 2
    cores, bench/results/scale.md). Under a sort-based shuffle strategy ``repartition`` ignores
    ``keys``, so there the group-by, correct under any strategy, is kept.
    """
    from ray.data.context import DataContext, ShuffleStrategy

    ctx = DataContext.get_current()
    if ctx.shuffle_strategy not in (ShuffleStrategy.HASH_SHUFFLE, ShuffleStrategy.SHUFFLE_V2):
        return ds.groupby("id").map_groups(first_of_group, batch_format="pyarrow")
    shuffled = ds.repartition(ctx.default_hash_shuffle_parallelism, keys=["id"])
    # batch_size=None: each call sees one whole block, so no id is split across calls
    return shuffled.map_batches(first_row_per_id, batch_size=None, batch_format="pyarrow")


def first_row_per_id(block: pa.Table) -> pa.Table:
    """The first row of each id in ``block``, in the block's order (pure, vectorized)."""
    import numpy as np

    if block.num_rows == 0:
        return block
    rows = pa.table({"id": block.column("id"), "row": np.arange(block.num_rows)})
    firsts = rows.group_by("id").aggregate([("row", "min")]).column("row_min").to_numpy()
    return block.take(np.sort(firsts))


def first_of_group(group: pa.Table) -> pa.Table:
    """Keep the first row of a group of rows that share one id."""
    return group.slice(0, 1)


def with_task(batch: pa.Table, *, key: str, id_prefix: str) -> pa.Table:
    """QUERIES rows of one task → the same rows with a ``task`` column (and, with several tasks,
    ids namespaced by the task's tag, since two tasks may ask about the same texts)."""
    ids = batch.column("id")
    if id_prefix:
        ids = pa.array([id_prefix + i for i in ids.to_pylist()], type=pa.string())
    return batch.set_column(batch.schema.get_field_index("id"), "id", ids).append_column(
        "task", pa.array([key] * batch.num_rows, type=pa.string()))


def task_sources(tasks: list[RunTask], split: str) -> list[Source]:
    """Each task's query source for ``split`` ('train' or 'eval'), resolved and checked before any
    work starts; an error names the task."""
    sources = []
    for task in tasks:
        path = task.queries.train_path if split == "train" else task.queries.eval_path
        try:
            source = resolve_source(path)
            check_columns(source, task.queries.text_column)
        except DataError as exc:
            if not task.tagged:
                raise
            raise DataError(f"task {task.key!r}: {exc}") from None
        sources.append(source)
    return sources


def read_task_queries(tasks: list[RunTask], sources: list[Source], max_rows: int | None = None) -> ray.data.Dataset:
    """All tasks' queries as one lazy dataset with a ``task`` column; ``max_rows`` per task."""
    parts = []
    for task, source in zip(tasks, sources):
        ds = read_queries(source, task.queries)
        if max_rows:
            ds = ds.limit(max_rows)
        parts.append(ds.map_batches(
            with_task,  # type: ignore[arg-type]  # keyword-only params, filled by fn_kwargs
            batch_format="pyarrow",
            fn_kwargs={"key": task.key, "id_prefix": f"{task.key}/" if task.tagged else ""}))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
