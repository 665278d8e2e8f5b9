"""`raydistill evaluate`: held-out queries as HTTP traffic to the Serve app → results + report.

    ray job submit --working-dir . -- python -m raydistill evaluate jobs/configs/demo_cpu.yaml --url http://127.0.0.1:8000

Writes ``<run_dir>/eval/``: ``results/<system>/*.parquet`` (one dataset: ``pq.read_table(".../results")``),
``report.md``, a self-contained ``report.html``,
``confusion.png``, ``accuracy_by_label.png``, ``latency.png`` and ``_manifest.json``.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raydistill.config import PipelineConfig
from raydistill.data.queries import read_task_queries, task_sources
from raydistill.errors import ConfigError, DataError
from raydistill.evaluate.client import ChatClient, expand_systems
from raydistill.evaluate.fidelity import answers_table, fidelity_summary, without_distributions
from raydistill.evaluate.free_report import free_payoff, free_summary_table
from raydistill.evaluate.metrics import PairStats, Span, SystemStats, comparison, pair_agreed, paired, payoff, truncate
from raydistill.evaluate.report import summary_table, task_table, write_report, write_task_index
from raydistill.manifest import write_manifest
from raydistill.models import check_models_on_nodes, resolve_model
from raydistill.outputs import check_output, staged_output
from raydistill.progress import ParquetRows, Progress
from raydistill.runtime import check_written, connect, ray_logs_dir
from raydistill.schema import parquet_files
from raydistill.storage import Location, location, write_parquet
from raydistill.tasks.pipeline_tasks import RunTask, run_tasks, specs_by_key
from raydistill.teacher.scoring import score_answers

logger = logging.getLogger(__name__)


def evaluate(cfg: PipelineConfig, base_url: str, *, overwrite: bool = False,
             stage_times: dict[str, float] | None = None) -> dict[str, Any]:
    started = time.time()
    out_dir = check_output(location(cfg.run_dir) / "eval", overwrite=overwrite, what="eval directory")
    tasks = run_tasks(cfg)
    free_keys = [t.key for t in tasks if t.spec.free]
    if free_keys and "teacher" not in cfg.eval.systems:
        raise ConfigError(f"free-form task(s) {free_keys} are scored against the teacher's answers: add teacher to "
                          "eval.systems")
    sources = task_sources(tasks, "eval")
    connect(cfg)
    # Read once: every system must get the same queries (a re-executed `limit` may pick others),
    # and a remote source is not fetched again per system.
    queries = read_task_queries(tasks, sources, cfg.eval.max_rows).materialize()
    with staged_output(out_dir) as staged:
        results = staged.partial / "results"
        send_traffic(cfg, base_url, tasks, queries, results)
        stats = collect_stats(results)
        overall = merge_stats(stats.values())
        n_rows = sum(s.requests for s in overall.systems.values())
        if not n_rows:
            raise DataError(f"no evaluation queries read from {[s.uri for s in sources]}; check the files")
        check_errors(overall, cfg.eval.max_error_rate, results)
        free = [t for t in tasks if t.spec.free]
        fidelity = score_free_tasks(cfg, free, results, staged.partial / "scores") if free else {}
        if free and len(free) < len(tasks):  # the overall agreement is the labelled tasks' alone
            overall.pairs = PairStats()
            for t in tasks:
                if not t.spec.free:
                    overall.pairs.merge(stats.get(t.key, ResultStats()).pairs)
        tmp = staged.local
        labels = list(dict.fromkeys(label for t in tasks for label in t.spec.labels))  # all tasks' labels, in order
        summary = analyze(overall, labels, cfg.eval.systems, fidelity.get(tasks[0].key) if len(tasks) == 1 else None)
        if len(tasks) == 1:
            write_report(tmp, stage_times=stage_times, **summary.pop("_report"))
        else:
            summary.pop("_report")
            per_task = {}
            for t in tasks:
                part = analyze(stats.get(t.key, ResultStats()), list(t.spec.labels), cfg.eval.systems,
                               fidelity.get(t.key))
                (tmp / "tasks" / t.key).mkdir(parents=True)
                write_report(tmp / "tasks" / t.key, stage_times=None, **part.pop("_report"))
                per_task[t.key] = part
            summary["tasks"] = per_task
            write_task_index(tmp, summary, stage_times)
        write_manifest(tmp, stage="evaluate", config=cfg.model_dump(),
                       inputs={"queries": {t.key: s.uri for t, s in zip(tasks, sources)}, "url": base_url},
                       counts={"rows": n_rows}, started=started, extra={"metrics": summary})
    logger.info("evaluate: wrote %s", out_dir)
    if "fidelity" in summary:
        print(free_summary_table(summary["systems"], summary["fidelity"], summary["payoff"]))  # noqa: T201
    else:
        print(summary_table(summary["systems"], summary["student_teacher_agreement"],  # noqa: T201 - the stage's output
                            summary["student_vs_teacher"], summary["payoff"]))
    if "tasks" in summary:
        print("\n" + task_table(summary["tasks"]))  # noqa: T201
    return summary


def send_traffic(cfg: PipelineConfig, base_url: str, tasks: list[RunTask], queries: Any, folder: Location) -> None:
    """Every query to every system as OpenAI requests; results as Parquet under ``folder/<system>``.
    Each system's results must hold one row per query, read back from run storage."""
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
        counter = ParquetRows(folder / system)
        with Progress(f"evaluate {system}", counter, n_queries, "requests"):
            written = write_parquet(results, folder / system, min_rows_per_file=cfg.eval.concurrency * 4)
        if written != n_queries:
            raise DataError(f"evaluate: {n_queries} queries were sent to {system} but {written} results came back; "
                            f"see the Ray logs ({ray_logs_dir()})")
        check_written(f"evaluate {system}", written, counter(), folder / system)
        logger.info("evaluate: %s done", system)


class ResultStats:
    """Mergeable statistics of a set of result rows: per system, and teacher vs student."""

    def __init__(self) -> None:
        self.systems: dict[str, SystemStats] = {}
        self.pairs = PairStats()

    def merge(self, other: ResultStats) -> None:
        for system, stats in other.systems.items():
            self.systems.setdefault(system, SystemStats()).merge(stats)
        self.pairs.merge(other.pairs)


def merge_stats(parts: Any) -> ResultStats:
    out = ResultStats()
    for part in parts:
        out.merge(part)
    return out


RESULT_COLUMNS = ["id", "task", "system", "gold", "label", "valid", "error", "latency_s", "started_at",
                  "num_input_tokens", "num_output_tokens", "query", "answer"]
PAIR_SCHEMA = pa.schema([(name, pa.string()) for name in ("id", "task", "system", "gold", "label", "query", "answer")])
BUCKET_BYTES = 8 << 20  # result files per pairing bucket: ~100k rows, ~100 MB as row dicts in its task
MAX_CHARS = 80  # disagreement examples show this much of a text (metrics.disagreements)


def _group_stats(paths: list[str], n_buckets: int) -> tuple[Any, ...]:
    """A Ray task over some result files: per task key, each system's ``SystemStats``; and the
    answered teacher/student rows, texts cut to what an example shows, split into ``n_buckets``
    tables by a hash of the query id (a query's rows of both systems meet in one bucket)."""
    stats: dict[str | None, ResultStats] = {}
    buckets: list[list[dict[str, Any]]] = [[] for _ in range(n_buckets)]
    for path in paths:
        for row in pq.read_table(path, columns=RESULT_COLUMNS).to_pylist():
            part = stats.setdefault(row["task"], ResultStats())
            part.systems.setdefault(row["system"], SystemStats()).add(row)
            if row["system"] in ("teacher", "student") and not row["error"]:
                short = {k: row[k] for k in ("id", "task", "system", "gold", "label")}
                short.update(query=truncate(row["query"], MAX_CHARS + 1), answer=truncate(row["answer"], MAX_CHARS + 1))
                buckets[zlib.crc32(row["id"].encode("utf-8")) % n_buckets].append(short)
    return (stats, *(pa.Table.from_pylist(b, schema=PAIR_SCHEMA) for b in buckets))


def _bucket_pairs(*tables: pa.Table) -> dict[str | None, PairStats]:
    """A Ray task: teacher and student rows of one bucket of query ids, paired per task key."""
    by_task: dict[str | None, list[dict[str, Any]]] = {}
    for row in pa.concat_tables(tables).to_pylist():
        by_task.setdefault(row["task"], []).append(row)
    out = {}
    for key, rows in by_task.items():
        out[key] = PairStats()
        out[key].add_pairs(paired(rows, "teacher", "student"))
    return out


def _collect_in_ray(groups: list[list[str]], n_buckets: int) -> dict[str | None, ResultStats]:
    """A Ray task (small task results are held by the process that started the tasks: this one,
    not the driver): system statistics per file group, then teacher/student pairs per bucket."""
    import ray

    group_task: Any = ray.remote(num_cpus=0.5, num_returns=1 + n_buckets)(_group_stats)
    bucket_task: Any = ray.remote(num_cpus=0.5)(_bucket_pairs)
    pending = [group_task.remote(g, n_buckets) for g in groups]
    pairs = [bucket_task.remote(*(p[1 + b] for p in pending)) for b in range(n_buckets)]
    out: dict[str | None, ResultStats] = {}
    waiting = [p[0] for p in pending]
    del pending
    while waiting:  # merged as they finish: one group's statistics in memory at a time
        ready, waiting = ray.wait(waiting, num_returns=1)
        for key, stats in ray.get(ready[0]).items():
            out.setdefault(key, ResultStats()).merge(stats)
    for part in ray.get(pairs):
        for key, pair_stats in part.items():
            out.setdefault(key, ResultStats()).pairs.merge(pair_stats)
    return out


def score_free_tasks(cfg: PipelineConfig, tasks: list[RunTask], results: Location, out: Location) -> dict[str, Any]:
    """The prompted teacher scores every answer of the free tasks (``teacher/scoring.py``); per
    task, ``fidelity.fidelity_summary`` of those scores and the answers. The scores are kept in
    ``eval/scores/`` (one row per query and system)."""
    import ray.data

    keys = [t.key for t in tasks]
    files = [results.child_uri(f.path) for f in results.list(".parquet", recursive=True)]
    answers = answers_table(files)
    answers = answers.filter(pc.is_in(answers["task"], pa.array(keys)))
    rows = ray.data.from_arrow(answers.select(["id", "task", "system", "query", "answer"]))
    model_path = resolve_model(cfg.teacher.model)
    check_models_on_nodes({cfg.teacher.model: model_path})
    scored = score_answers(rows, specs_by_key(tasks), cfg.teacher, model_path)
    counter = ParquetRows(out)
    with Progress("evaluate: the teacher scores the answers", counter, answers.num_rows, "answers"):
        written = write_parquet(scored, out, min_rows_per_file=16)  # a file per 16: the progress line moves
    if written != answers.num_rows:
        raise DataError(f"evaluate: {answers.num_rows} answers were sent to be scored but {written} scores came back; "
                        f"see the Ray logs ({ray_logs_dir()})")
    check_written("evaluate scores", written, counter(), out)
    scores = pa.concat_tables([pq.read_table(f) for f in parquet_files(out)])
    unscored = scores.filter(pc.is_valid(scores["error"]))
    if unscored.num_rows:
        logger.warning("evaluate: %d answers not scored (first: %s)", unscored.num_rows, unscored["error"][0])
    return {key: fidelity_summary(answers.filter(pc.equal(answers["task"], key)),
                                  scores.filter(pc.equal(scores["task"], key))) for key in keys}


def check_errors(stats: ResultStats, max_rate: float, results: Location) -> None:
    """Fail when a system's failed requests exceed ``eval.max_error_rate``, naming the first error."""
    for system, s in sorted(stats.systems.items()):
        if s.errors > max_rate * s.requests:
            raise DataError(f"evaluate: {s.errors} of {s.requests} {system} requests failed (first: "
                            f"{first_error(results / system)}), over eval.max_error_rate={max_rate}; check the Serve "
                            f"app and its logs, or raise eval.max_error_rate")


def first_error(folder: Location) -> str:
    import pyarrow.compute as pc

    for uri in parquet_files(folder):
        errors = pq.read_table(uri, columns=["error"])["error"].drop_null()
        errors = errors.filter(pc.not_equal(errors, ""))
        if len(errors):
            return str(errors[0].as_py()).splitlines()[0][:200]
    return "no message"


def collect_stats(folder: Location) -> dict[str | None, ResultStats]:
    """The statistics of every result file under ``folder``, per task key, computed by Ray tasks
    over groups of files (~8 MB each) and merged: the driver gets a few kB per task, whatever the
    number of rows. Pairing teacher and student by query id is a hash partition of the answered
    rows (ids and labels, texts cut to 81 characters) into buckets of ~8 MB of result files."""
    import ray

    files = [(folder.child_uri(f.path), f.size) for f in folder.list(".parquet", recursive=True)]
    if not files:
        return {}
    groups: list[list[str]] = [[]]
    size = 0
    for path, nbytes in files:
        if groups[-1] and size + nbytes > BUCKET_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(path)
        size += nbytes
    n_buckets = max(1, -(-sum(n for _, n in files) // BUCKET_BYTES))
    task: Any = ray.remote(num_cpus=0)(_collect_in_ray)
    return ray.get(task.remote(groups, n_buckets))


def analyze(stats: ResultStats, labels: list[str], systems: Sequence[str],
            fidelity: dict[str, Any] | None = None) -> dict[str, Any]:
    """The summary of one set of result rows (one task, or all of them), JSON-ready; ``_report``
    holds write_report's arguments. ``fidelity``: a free task's (``fidelity.fidelity_summary``),
    which replaces label agreement."""
    metrics = {s: stats.systems[s].metrics() for s in sorted(stats.systems)}
    agreed, n = pair_agreed(stats.pairs.pairs)
    agree = agreed / n if n and fidelity is None else None
    compared = comparison(stats.pairs, metrics, labels)
    gains = payoff(metrics, compared) if fidelity is None else free_payoff(metrics, compared, fidelity)
    if fidelity is not None:
        compared.update(agreement=None, agreement_ci95=None)
    get = {s: stats.systems.get(s, SystemStats()) for s in systems}
    by_label: dict[str, dict[str, float | None]] = {s: get[s].accuracy_by_label(labels) for s in systems}
    span = Span()
    for system_stats in stats.systems.values():
        span.merge(system_stats.span)
    report = {
        "metrics": metrics, "agreement": agree, "labels": labels, "by_label": by_label,
        "matrices": {s: get[s].confusion(labels) for s in systems},
        # the CDF plot's points: every latency up to 100,000 per system, else 2,000 quantiles
        "latencies": {s: get[s].latency.points() for s in systems},
        "comparison": compared, "payoff": gains,
    }
    summary = {"systems": metrics, "student_teacher_agreement": agree, "accuracy_by_label": by_label,
               "throughput_rps": span.throughput(), "payoff": gains,
               "student_vs_teacher": compared, "_report": report}
    if fidelity is not None:
        report["fidelity"] = fidelity
        summary["fidelity"] = without_distributions(fidelity)
    return summary
