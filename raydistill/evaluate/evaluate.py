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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from raydistill.config import PipelineConfig
from raydistill.data.queries import read_task_queries, task_sources
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
from raydistill.evaluate.report import summary_table, task_table, write_report, write_task_index
from raydistill.manifest import write_manifest
from raydistill.outputs import check_output, staged_output
from raydistill.progress import Progress, parquet_rows
from raydistill.runtime import init_ray
from raydistill.tasks.pipeline_tasks import RunTask, run_tasks, specs_by_key

logger = logging.getLogger(__name__)


def evaluate(cfg: PipelineConfig, base_url: str, *, overwrite: bool = False,
             stage_times: dict[str, float] | None = None) -> dict[str, Any]:
    started = time.time()
    out_dir = check_output(Path(cfg.run_dir) / "eval", overwrite=overwrite, what="eval directory")
    tasks = run_tasks(cfg)
    sources = task_sources(tasks, "eval")
    init_ray(cfg.cluster)
    # Read once: every system must get the same queries (a re-executed `limit` may pick others),
    # and a remote source is not fetched again per system.
    queries = read_task_queries(tasks, sources, cfg.eval.max_rows).materialize()
    with staged_output(out_dir) as tmp:
        send_traffic(cfg, base_url, tasks, queries, tmp / "results")
        rows = pq.read_table(tmp / "results").to_pylist()
        if not rows:
            raise DataError(f"no evaluation queries read from {[s.uri for s in sources]}; check the files")
        labels = list(dict.fromkeys(label for t in tasks for label in t.spec.labels))  # all tasks' labels, in order
        summary = analyze(rows, labels, cfg.eval.systems)
        if len(tasks) == 1:
            write_report(tmp, stage_times=stage_times, **summary.pop("_report"))
        else:
            summary.pop("_report")
            per_task = {}
            for t in tasks:
                part = analyze([r for r in rows if r["task"] == t.key], list(t.spec.labels), cfg.eval.systems)
                (tmp / "tasks" / t.key).mkdir(parents=True)
                write_report(tmp / "tasks" / t.key, stage_times=None, **part.pop("_report"))
                per_task[t.key] = part
            summary["tasks"] = per_task
            write_task_index(tmp, summary, stage_times)
        write_manifest(tmp, stage="evaluate", config=cfg.model_dump(),
                       inputs={"queries": {t.key: s.uri for t, s in zip(tasks, sources)}, "url": base_url},
                       counts={"rows": len(rows)}, started=started, extra={"metrics": summary})
    logger.info("evaluate: wrote %s", out_dir)
    print(summary_table(summary["systems"], summary["student_teacher_agreement"],  # noqa: T201 - the stage's output
                        summary["student_vs_teacher"], summary["payoff"]))
    if "tasks" in summary:
        print("\n" + task_table(summary["tasks"]))  # noqa: T201
    return summary


def send_traffic(cfg: PipelineConfig, base_url: str, tasks: list[RunTask], queries: Any, folder: Path) -> None:
    """Every query to every system as OpenAI requests; results as Parquet under ``folder/<system>``."""
    import ray.data

    n_queries = queries.count()
    client = {"base_url": base_url, "tasks": specs_by_key(tasks), "tagged": tasks[0].tagged,
              "max_tokens": cfg.eval.max_tokens, "concurrency": cfg.eval.concurrency,
              "timeout_s": cfg.eval.request_timeout_s}
    # One pass per system, one after the other, at the same concurrency: each system's
    # requests/s is then measured over its own window, not diluted by the others' traffic.
    for system in cfg.eval.systems:
        traffic = queries.map_batches(expand_systems, fn_kwargs={"systems": [system]}, batch_format="numpy")
        results = traffic.map_batches(ChatClient, fn_constructor_kwargs=client, batch_size=cfg.eval.concurrency * 4,
                                      batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1),
                                      num_cpus=0.25)
        # a file per client batch: the progress line counts requests answered as they finish
        with Progress(f"evaluate {system}", functools.partial(parquet_rows, folder / system), n_queries, "requests"):
            results.write_parquet(str(folder / system), min_rows_per_file=cfg.eval.concurrency * 4)
        logger.info("evaluate: %s done", system)


def analyze(rows: list[dict[str, Any]], labels: list[str], systems: Sequence[str]) -> dict[str, Any]:
    """The summary of one set of result rows (one task, or all of them), JSON-ready; ``_report``
    holds write_report's arguments."""
    metrics = system_metrics(rows)
    agree = agreement(rows, "student", "teacher")
    comparison = compare(rows, metrics, labels)
    gains = payoff(metrics, comparison)
    by_label: dict[str, dict[str, float | None]] = {s: accuracy_by_label(rows, s, labels) for s in systems}
    report = {
        "metrics": metrics, "agreement": agree, "labels": labels, "by_label": by_label,
        "matrices": {s: confusion(rows, s, labels) for s in systems},
        "latencies": {s: [r["latency_s"] for r in rows if r["system"] == s and not r["error"] and r["latency_s"] is not None]
                      for s in systems},
        "comparison": comparison, "payoff": gains,
    }
    return {"systems": metrics, "student_teacher_agreement": agree, "accuracy_by_label": by_label,
            "throughput_rps": throughput([r for r in rows if not r["error"]]), "payoff": gains,
            "student_vs_teacher": comparison, "_report": report}
