"""The target prompt's identity across stages.

Every sample records the sha256 of the target prompt its teacher saw (``TaskSpec.prompt_sha256``:
system prompt, demonstrations, user template, answer prefix), and the samples and student
manifests record it per task. A stage that builds on an earlier one's artifact compares those
hashes with the config's task before any work: resuming generate with an edited prompt would
mix two teachers in one dataset, and training or serving on samples of another prompt would
distill the wrong prompt, both silently. ``allow_prompt_change=true`` is the explicit override.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.compute as pc
import pyarrow.parquet as pq

from raydistill.errors import ConfigError
from raydistill.storage import Location, location

if TYPE_CHECKING:
    from raydistill.tasks.pipeline_tasks import RunTask

logger = logging.getLogger(__name__)


def _single_value(metadata: pq.FileMetaData, row_group: int, column: int | None) -> str | None:
    """The one value a row group's column holds, when its statistics say so (else None)."""
    if column is None:
        return None
    stats = metadata.row_group(row_group).column(column).statistics
    if stats is None or not stats.has_min_max or stats.min != stats.max or stats.null_count:
        return None
    value = stats.min
    return value.decode() if isinstance(value, bytes) else str(value)


def recorded_in_files(files: Iterable[str | Path | Location], default_task: str) -> dict[str, set[str]]:
    """Task key → the prompt hashes the samples files record. Read from the Parquet footers'
    statistics where a row group holds one task and one prompt (the usual case, and no data is
    read); else those two columns of that row group. Rows without a task column count as
    ``default_task`` (samples of one task)."""
    found: dict[str, set[str]] = {}
    for f in files:
        loc = location(f)
        parquet = pq.ParquetFile(loc.path, filesystem=loc.fs)
        meta = parquet.metadata
        index = {meta.schema.column(j).path: j for j in range(meta.num_columns)}
        if "prompt_sha256" not in index:
            continue
        for rg in range(meta.num_row_groups):
            task = _single_value(meta, rg, index.get("task")) if "task" in index else default_task
            prompt = _single_value(meta, rg, index["prompt_sha256"])
            if task is not None and prompt is not None:
                found.setdefault(task, set()).add(prompt)
                continue
            columns = ["prompt_sha256"] + (["task"] if "task" in index else [])
            table = parquet.read_row_group(rg, columns=columns)
            tasks = table["task"] if "task" in index else None
            for key in pc.unique(tasks).to_pylist() if tasks is not None else [default_task]:
                rows = table if tasks is None else table.filter(pc.is_null(tasks) if key is None else pc.equal(tasks, key))
                found.setdefault(key or default_task, set()).update(pc.unique(rows["prompt_sha256"]).to_pylist())
    return found


def check_prompts(recorded: Mapping[str, Iterable[str] | str], tasks: list[RunTask], what: str, *, allow: bool) -> None:
    """Refuse (or, with ``allow``, warn about) an artifact made with another target prompt than
    a config task's, naming both hashes. Tasks the artifact does not record are not checked."""
    for t in tasks:
        got = recorded.get(t.key)
        hashes = {got} if isinstance(got, str) else set(got or ())
        other = sorted(hashes - {t.spec.prompt_sha256})
        if not other:
            continue
        message = (f"{what} was made with another target prompt for task {t.key!r} (sha256 {other[0][:16]}) than the "
                   f"config's (sha256 {t.spec.prompt_sha256[:16]})")
        if allow:
            logger.warning("%s; used anyway (allow_prompt_change=true)", message)
            continue
        raise ConfigError(f"{message}; undo the prompt change, start over with --overwrite, or set "
                          f"allow_prompt_change=true to use it anyway")


def manifest_prompts(folder: Location) -> dict[str, str] | None:
    """The per-task prompt hashes an artifact's manifest records (None: no manifest or none recorded)."""
    try:
        recorded = (folder / "_manifest.json").read_json().get("prompt_sha256")
    except (FileNotFoundError, ValueError, AttributeError):
        return None
    return recorded if isinstance(recorded, dict) else None
