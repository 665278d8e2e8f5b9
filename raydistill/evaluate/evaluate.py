"""`raydistill evaluate`: held-out queries as HTTP traffic to the Serve app → results + report.

    ray job submit --working-dir . -- python -m raydistill evaluate jobs/configs/demo_cpu.yaml --url http://127.0.0.1:8000

Writes ``<run_dir>/eval/``: ``results/<system>/*.parquet`` (one dataset: ``pq.read_table(".../results")``),
``report.md``, a self-contained ``report.html``,
``confusion.png``, ``accuracy_by_label.png``, ``latency.png`` and ``_manifest.json``.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from raydistill.config import PipelineConfig
from raydistill.data.queries import read_queries
from raydistill.data.sources import check_columns, resolve_source
from raydistill.errors import DataError
from raydistill.evaluate.client import ChatClient, expand_systems
from raydistill.evaluate.metrics import (
    accuracy_by_label,
    agreement,
    compare,
    confusion,
    payoff,
    system_metrics,
    throughput,
)
from raydistill.evaluate.report import summary_table, write_report
from raydistill.manifest import write_manifest
from raydistill.outputs import check_output, staged_output
from raydistill.progress import Progress, parquet_rows
from raydistill.runtime import init_ray
from raydistill.tasks.task import task_for

logger = logging.getLogger(__name__)


def evaluate(cfg: PipelineConfig, base_url: str, *, overwrite: bool = False,
             stage_times: dict[str, float] | None = None) -> dict[str, Any]:
    started = time.time()
    out_dir = check_output(Path(cfg.run_dir) / "eval", overwrite=overwrite, what="eval directory")
    task = task_for(cfg.task)
    source = resolve_source(cfg.queries.eval_path)
    check_columns(source, cfg.queries.text_column)
    import ray.data

    init_ray(cfg.cluster)
    queries = read_queries(source, cfg.queries)
    if cfg.eval.max_rows:
        queries = queries.limit(cfg.eval.max_rows)
    # Read once: every system must get the same queries (a re-executed `limit` may pick others),
    # and a remote source is not fetched again per system.
    queries = queries.materialize()
    n_queries = queries.count()
    client = {"base_url": base_url, "task": task, "max_tokens": cfg.eval.max_tokens,
              "concurrency": cfg.eval.concurrency, "timeout_s": cfg.eval.request_timeout_s}
    with staged_output(out_dir) as tmp:
        # One pass per system, one after the other, at the same concurrency: each system's
        # requests/s is then measured over its own window, not diluted by the others' traffic.
        for system in cfg.eval.systems:
            traffic = queries.map_batches(expand_systems, fn_kwargs={"systems": [system]}, batch_format="numpy")
            results = traffic.map_batches(ChatClient, fn_constructor_kwargs=client, batch_size=cfg.eval.concurrency * 4,
                                          batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1),
                                          num_cpus=0.25)
            folder = tmp / "results" / system
            # a file per client batch: the progress line counts requests answered as they finish
            with Progress(f"evaluate {system}", functools.partial(parquet_rows, folder), n_queries, "requests"):
                results.write_parquet(str(folder), min_rows_per_file=cfg.eval.concurrency * 4)
            logger.info("evaluate: %s done", system)
        rows = pq.read_table(tmp / "results").to_pylist()
        if not rows:
            raise DataError(f"no evaluation queries read from {cfg.queries.eval_path!r}; check the file")
        metrics = system_metrics(rows)
        agree = agreement(rows, "student", "teacher")
        labels = list(task.labels)
        # keyed by system name as write_report takes them (str, not the config's Literal)
        matrices: dict[str, np.ndarray] = {s: confusion(rows, s, labels) for s in cfg.eval.systems}
        by_label: dict[str, dict[str, float | None]] = {s: accuracy_by_label(rows, s, labels) for s in cfg.eval.systems}
        latencies: dict[str, list[float]] = {
            s: [r["latency_s"] for r in rows if r["system"] == s and not r["error"] and r["latency_s"] is not None]
            for s in cfg.eval.systems}
        comparison = compare(rows, metrics, labels)
        gains = payoff(metrics, comparison)
        write_report(tmp, metrics, agree, matrices, labels, stage_times, by_label, latencies, comparison, gains)
        summary = {"systems": metrics, "student_teacher_agreement": agree, "accuracy_by_label": by_label,
                   "throughput_rps": throughput([r for r in rows if not r["error"]]), "payoff": gains,
                   "student_vs_teacher": comparison}
        write_manifest(tmp, stage="evaluate", config=cfg.model_dump(),
                       inputs={"queries": cfg.queries.eval_path, "url": base_url}, counts={"rows": len(rows)},
                       started=started, extra={"metrics": summary})
    logger.info("evaluate: wrote %s", out_dir)
    print(summary_table(metrics, agree, comparison, gains))  # noqa: T201 - the table is the stage's user-facing output
    return summary
