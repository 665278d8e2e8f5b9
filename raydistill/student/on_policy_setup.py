"""The driver's side of on-policy distillation: the tokenizer check before any work, and the
query file the workers read (which training queries the steps use, which held-out queries measure
the reverse KL, each as the token ids of its two prompts)."""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from raydistill.config import PipelineConfig
from raydistill.errors import DataError
from raydistill.storage import Location
from raydistill.student.examples import is_validation
from raydistill.student.on_policy import check_same_tokenizer, query_prompts, serves_prefix
from raydistill.tasks.task import TaskSpec

logger = logging.getLogger(__name__)

QUERY_FILE = "on_policy_queries.parquet"
QUERIES = pa.schema([
    pa.field("id", pa.string(), nullable=False), pa.field("task", pa.string()), pa.field("split", pa.string()),
    pa.field("query", pa.string()), pa.field("student_ids", pa.list_(pa.int32())),
    pa.field("teacher_ids", pa.list_(pa.int32())), pa.field("prefix_ids", pa.list_(pa.int32())),
    pa.field("student_has_prefix", pa.bool_()),
])


def check_tokenizers(student_path: str, teacher_path: str, cfg: PipelineConfig) -> Any:
    """The teacher's tokenizer, after refusing one that reads the student's tokens differently."""
    from transformers import AutoTokenizer

    student, teacher = AutoTokenizer.from_pretrained(student_path), AutoTokenizer.from_pretrained(teacher_path)
    check_same_tokenizer(student, teacher, cfg.train.student_model, cfg.teacher.model)
    return teacher


def wanted(cfg: PipelineConfig) -> tuple[int, int]:
    """(training queries, held-out queries) the on-policy steps use: each step takes
    ``queries_per_step`` new queries per worker until the set wraps around."""
    op, workers = cfg.train.on_policy, cfg.train.num_workers
    return op.steps * op.queries_per_step * workers, op.eval_queries


def select_queries(batches: Any, cfg: PipelineConfig, default_task: str) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    """(id, task, query) of distinct training and held-out (validation split) queries, in the
    samples' order, read a batch at a time until both counts are reached (pure)."""
    n_train, n_eval = wanted(cfg)
    seen: set[str] = set()
    train: list[tuple[str, str, str]] = []
    held_out: list[tuple[str, str, str]] = []
    for batch in batches:
        cols = batch.to_pydict()
        tasks = cols.get("task") or [default_task] * len(cols["id"])
        for qid, task, query in zip(cols["id"], tasks, cols["query"]):
            if qid in seen:
                continue
            seen.add(qid)
            side = held_out if is_validation(qid, cfg.train.val_fraction) else train
            if len(side) < (n_eval if side is held_out else n_train):
                side.append((qid, task or default_task, query))
        if len(train) >= n_train and len(held_out) >= n_eval:
            break
    return train, held_out


def query_table(rows: list[tuple[str, str, str]], split: str, student_tok: Any, teacher_tok: Any,
                tasks: dict[str, TaskSpec], cfg: PipelineConfig) -> list[dict[str, Any]]:
    """Rows of the query file; a query whose prompt and longest answer do not fit the student's
    ``train.max_seq_len`` or the teacher's ``max_model_len`` is left out."""
    op, out = cfg.train.on_policy, []
    for qid, task, query in rows:
        p = query_prompts(student_tok, teacher_tok, tasks[task], query, serves_prefix(tasks[task], cfg))
        if len(p.student) + op.max_tokens > cfg.train.max_seq_len or len(p.teacher) + op.max_tokens + 1 > cfg.teacher.max_model_len:
            continue
        out.append({"id": qid, "task": task, "split": split, "query": query, "student_ids": p.student,
                    "teacher_ids": p.teacher, "prefix_ids": p.prefix, "student_has_prefix": p.student_has_prefix})
    return out


def write_queries(cfg: PipelineConfig, batches: Any, folder: Location, student_tok: Any, teacher_tok: Any,
                  tasks: dict[str, TaskSpec]) -> tuple[Location, dict[str, int]]:
    """The query file in ``folder`` (the staged student: it stays with the student it trained)."""
    workers = cfg.train.num_workers
    train, held_out = select_queries(batches, cfg, next(iter(tasks)))
    train_rows = query_table(train, "train", student_tok, teacher_tok, tasks, cfg)
    eval_rows = query_table(held_out, "eval", student_tok, teacher_tok, tasks, cfg)
    if len(train_rows) < workers:
        raise DataError(f"train.on_policy needs at least one training query per worker ({workers}); "
                        f"{len(train_rows)} fit train.max_seq_len={cfg.train.max_seq_len} with "
                        f"train.on_policy.max_tokens={cfg.train.on_policy.max_tokens}: label more queries or raise max_seq_len")
    if eval_rows and len(eval_rows) < workers:  # every rank takes part in each held-out pass
        logger.warning("train: %d held-out queries for %d workers: no held-out reverse KL (raise train.val_fraction)",
                       len(eval_rows), workers)
        eval_rows = []
    path = folder / QUERY_FILE
    with path.fs.open_output_stream(path.path) as fh:
        pq.write_table(pa.Table.from_pylist(train_rows + eval_rows, schema=QUERIES), fh)
    counts = {"train_queries": len(train_rows), "eval_queries": len(eval_rows)}
    logger.info("train: on-policy on %d training queries (%d held out for the reverse KL)", *counts.values())
    return path, counts
