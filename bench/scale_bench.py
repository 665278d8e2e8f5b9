"""Scale bench (issue 18): every path around the engines at 10^4 .. 10^7 rows on one machine.

    mkdir -p /tmp/rd; flock /tmp/rd/cpu.lock scripts/loopback-only .venv/bin/python bench/scale_bench.py

Per path and size, a fresh process (the driver) starts a local Ray cluster and runs the path on
rows generated on the fly (the built-in langid demo texts, repeated with distinct ids), while a
thread samples the RSS of the driver and of every process under it (Ray's workers, named by
their process title) every 0.2 s. Paths:

  * ``queries``: ``read_queries``/``read_task_queries`` over many JSONL and Parquet files, with
    and without ``dedup``, consumed by ``count()`` (the reads and normalization run in Ray);
  * ``ledger``: ``--resume`` over a samples output that already holds n (id, sample) pairs:
    ``put_finished_samples`` (hash, merge, object store), generate's summary of that output
    (``summarize_files``), then the request UDF
    (``TeacherRequests``) receiving the array and labelling a batch of 2,000 queries, half done;
  * ``train``: ``check_samples`` at every size; ``example_datasets`` (the real tokenizing
    ``ExampleBuilder`` pool) up to 10^5 samples; one epoch of ``streaming_split(2)`` shards iterated
    as the training loop does (shuffle buffer, length buckets, collate; no model step) over
    synthetic examples of the builder's measured lengths up to 10^6;
  * ``evaluate``: ``collect_stats`` + ``analyze`` (overall and per task, 2 tasks) + the report
    over n result rows (half teacher, half student) in files of 1,024 rows.

Writes ``bench/results/scale.{json,md}``. ``--sizes 10000,100000`` and ``--paths ledger``
run a subset (results then go to ``--out``, default the same files).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from common import REPO, RESULTS, git_commit

SIZES = [10**4, 10**5, 10**6, 10**7]
PATHS = ["queries-jsonl", "queries-parquet", "queries-dedup", "ledger", "train", "evaluate"]
# the largest size each part runs at, and why (the md says so too)
LIMITS = {
    ("train", "examples"): (10**5, "the tokenizing ExampleBuilder takes ~0.7 ms a sample on this machine with one actor "
                                   "or two (the fast tokenizer already uses both cores): 10^6 samples would take ~12 min "
                                   "of the bench's 40"),
    ("train", "epoch"): (10**6, "10^7 examples are ~18 GB in the object store (the examples are materialized)"),
}
PATH_MAX: dict[str, int] = {}  # paths whose every phase is in LIMITS
PATH_MIN = {"queries-dedup": 10**5}  # the shuffle's fixed costs dominate below; saves the bench ~75 s
CHILD_TIMEOUT_S = 900
CPUS = 4  # logical CPUs of the local cluster (2 cores): room for 0.5-CPU tasks next to actors
OBJECT_STORE = 3 << 30
TOKENIZER = str(REPO / "tests" / "data" / "smollm2-tokenizer")


# ---------------------------------------------------------------- RSS sampling

class Sampler(threading.Thread):
    """Peak RSS of this process and of each kind of process under it, per phase."""

    def __init__(self, every_s: float = 0.2):
        super().__init__(daemon=True)
        import psutil

        self.me = psutil.Process()
        self.every_s = every_s
        self.lock = threading.Lock()
        self.driver_peak = 0
        self.kinds: dict[str, int] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            time.sleep(self.every_s)

    def sample(self) -> None:
        import psutil

        driver = self.me.memory_info().rss
        kinds: dict[str, int] = {}
        for proc in self.me.children(recursive=True):
            try:
                kind, rss = process_kind(proc), proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            kinds[kind] = max(kinds.get(kind, 0), rss)
        with self.lock:
            self.driver_peak = max(self.driver_peak, driver)
            for kind, rss in kinds.items():
                self.kinds[kind] = max(self.kinds.get(kind, 0), rss)

    def reset(self) -> None:
        with self.lock:
            self.driver_peak, self.kinds = 0, {}
        self.sample()

    @contextmanager
    def phase(self, name: str, out: dict[str, Any]) -> Iterator[dict[str, Any]]:
        self.reset()
        record: dict[str, Any] = {}
        t0 = time.perf_counter()
        yield record
        wall = time.perf_counter() - t0
        self.sample()
        with self.lock:
            record.update(wall_s=round(wall, 3), driver_peak_rss_mb=mb(self.driver_peak),
                          worker_peak_rss_mb={k: mb(v) for k, v in sorted(self.kinds.items())})
        out[name] = record


def process_kind(proc: Any) -> str:
    """A Ray worker by its process title (``ray::<task or actor>``), else the program's name."""
    cmd = proc.cmdline()
    title = cmd[0] if cmd else proc.name()
    if title.startswith("ray::"):
        return title.split(" ")[0]
    name = Path(title).name
    if name.startswith("python") and len(cmd) > 1:  # Ray's python helpers: name them by their script
        script = next((Path(c).name for c in cmd[1:] if c.endswith(".py")), "")
        return f"python {script}".strip()
    return name


def mb(nbytes: float) -> float:
    return round(nbytes / 2**20, 1)


# ---------------------------------------------------------------- data, generated on the fly

def text_pool() -> tuple[list[str], list[str]]:
    from raydistill.data.builtin import build_langid_demo

    rows = [r for split in build_langid_demo().values() for r in split]
    return [r["text"] for r in rows], [r["gold"] for r in rows]


def query_files(folder: Path, n: int, fmt: str) -> Path:
    """n queries in max(8, n / 10^5) files; every 10th row repeats the id before it (dedup drops it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = folder / f"queries-{fmt}-{n}"
    if (out / "_done").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    texts, golds = text_pool()
    encoded = [json.dumps(t, ensure_ascii=False) for t in texts]
    n_files = max(8, n // 100_000)
    for f in range(n_files):
        lo, hi = f * n // n_files, (f + 1) * n // n_files
        idx = np.arange(lo, hi)
        ids = idx - (idx % 10 == 0) * (idx > 0)
        pick = idx % len(texts)
        if fmt == "jsonl":
            with open(out / f"part-{f:05d}.jsonl", "w", encoding="utf-8") as fh:
                fh.writelines(f'{{"id": "q{i}", "text": {encoded[j]}, "gold": "{golds[j]}"}}\n' for i, j in zip(ids, pick))
        else:
            table = pa.table({"id": pa.array([f"q{i}" for i in ids]), "text": pa.array(texts).take(pa.array(pick)),
                              "gold": pa.array(golds).take(pa.array(pick))})
            pq.write_table(table, out / f"part-{f:05d}.parquet")
    (out / "_done").write_text("")
    return out


def samples_files(folder: Path, n: int, rows_per_file: int = 10_000) -> Path:
    """A samples folder (SAMPLES schema) of n valid samples, k=1, in files of ``rows_per_file``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raydistill.schema import SAMPLES

    out = folder / f"samples-{n}"
    if (out / "_done").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    texts, golds = text_pool()
    names = {"ar": "Arabic", "de": "German", "el": "Greek", "en": "English", "es": "Spanish", "fr": "French",
             "hi": "Hindi", "ru": "Russian", "tr": "Turkish", "ur": "Urdu", "vi": "Vietnamese", "zh": "Chinese"}
    text_arr, gold_arr = pa.array(texts), pa.array(golds)
    resp = pa.array([f" {names.get(g, 'Latin')}." for g in golds])
    for f, lo in enumerate(range(0, n, rows_per_file)):
        idx = np.arange(lo, min(n, lo + rows_per_file))
        pick = pa.array(idx % len(texts))
        m = len(idx)
        cols = {name: pa.nulls(m, SAMPLES.field(name).type) for name in SAMPLES.names}
        cols.update(id=pa.array([f"{i:016x}" for i in idx]), task=pa.array(["langid"] * m), query=text_arr.take(pick),
                    gold=gold_arr.take(pick), sample_index=pa.array(np.zeros(m, np.int32)),
                    prompt_sha256=pa.array(["0" * 64] * m), teacher_model=pa.array(["teacher"] * m),
                    response=resp.take(pick), label=gold_arr.take(pick), valid=pa.array(np.ones(m, bool)),
                    num_input_tokens=pa.array(np.full(m, 160, np.int32)), num_output_tokens=pa.array(np.full(m, 4, np.int32)))
        pq.write_table(pa.table(cols, schema=SAMPLES), out / f"part-{f:06d}.parquet")
    (out / "_done").write_text("")
    return out


def result_files(folder: Path, n: int, rows_per_file: int = 1_024) -> Path:
    """n evaluation result rows (EVAL_RESULTS): n/2 queries of 2 tasks, answered by teacher and
    student, in files of ``rows_per_file`` (a file per client batch, as evaluate writes them)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raydistill.schema import EVAL_RESULTS

    out = folder / f"results-{n}"
    if (out / "_done").exists():
        return out
    texts, golds = text_pool()
    labels = sorted(set(golds))
    rng = np.random.default_rng(0)
    text_arr, gold_arr = pa.array(texts), pa.array(golds)
    for system in ("teacher", "student"):
        (out / system).mkdir(parents=True, exist_ok=True)
        for f, lo in enumerate(range(0, n // 2, rows_per_file)):
            idx = np.arange(lo, min(n // 2, lo + rows_per_file))
            m = len(idx)
            pick = pa.array(idx % len(texts))
            gold = gold_arr.take(pick)
            wrong = rng.random(m) < (0.3 if system == "teacher" else 0.25)
            label = np.where(wrong, np.array(labels)[rng.integers(len(labels), size=m)], np.asarray(gold.to_pylist()))
            error = rng.random(m) < 0.001
            task = np.where(idx % 4 == 0, "b", "a")
            table = pa.table({
                "id": pa.array([f"{t}/{i:016x}" for t, i in zip(task, idx)]), "task": pa.array(task), "query": text_arr.take(pick),
                "gold": gold, "system": pa.array([system] * m), "answer": pa.array([None if e else f"This text is written in {x}."
                                                                                    for e, x in zip(error, label)]),
                "label": pa.array([None if e else x for e, x in zip(error, label)]), "valid": pa.array(~error),
                "error": pa.array(["HTTP 500" if e else None for e in error]),
                "latency_s": pa.array(np.where(error, np.nan, rng.lognormal(0, 0.5, m)), from_pandas=True),
                "started_at": pa.array(1e9 + idx / 100.0), "num_input_tokens": pa.array(np.full(m, 1400 if system == "teacher" else 117, np.int32)),
                "num_output_tokens": pa.array(np.full(m, 6, np.int32))}, schema=EVAL_RESULTS)
            pq.write_table(table, out / system / f"part-{f:06d}.parquet")
    (out / "_done").write_text("")
    return out


# ---------------------------------------------------------------- the paths (in the child)

def run_queries(fmt: str, dedup: bool, n: int, work: Path, s: Sampler, phases: dict[str, Any]) -> dict[str, Any]:
    from raydistill.config import QueriesConfig
    from raydistill.data.queries import read_task_queries
    from raydistill.data.sources import resolve_source
    from raydistill.tasks.pipeline_tasks import RunTask
    from raydistill.tasks.task import load_task

    folder = query_files(work, n, fmt)
    with s.phase(f"{fmt}{'+dedup' if dedup else ''}", phases):
        cfg = QueriesConfig(train_path=str(folder), eval_path=str(folder), dedup=dedup)
        task = RunTask("langid", load_task("langid"), cfg, None, tagged=False)
        count = read_task_queries([task], [resolve_source(str(folder))]).count()
    assert count == (n - (n - 1) // 10 if dedup else n), count
    return {"rows_out": count, "files": max(8, n // 100_000)}


def run_ledger(n: int, work: Path, s: Sampler, phases: dict[str, Any]) -> dict[str, Any]:
    import ray

    from raydistill.config import TeacherConfig
    from raydistill.tasks.task import load_task
    from raydistill.teacher.generate import summarize_files
    from raydistill.teacher.ledger import put_finished_samples
    from raydistill.teacher.requests import sample_key

    folder = samples_files(work, n)
    with s.phase("read_keys", phases):
        done_ref, n_done, torn = put_finished_samples(folder)
    assert n_done == n and torn == 0
    with s.phase("summary", phases):  # generate's summary over the same output
        summary = summarize_files(sorted(str(f) for f in folder.glob("*.parquet")), ["langid"])
    assert summary["rows"] == n and summary["queries"] == n and summary["duplicate_samples"] == 0
    nbytes, writeable = ray.get(ray.remote(array_facts).remote([done_ref]))
    batch_n = 2_000
    half = min(batch_n // 2, n)
    # the first `half` queries are done (ids 0..half-1 are in the output), the rest are new
    ids = [f"{i:016x}" for i in range(half)] + [f"new{i:012x}" for i in range(batch_n - half)]
    batch = {"id": np.array(ids, dtype=object), "task": np.array(["langid"] * batch_n, dtype=object),
             "text": np.array(["Das ist ein kurzer Satz auf Deutsch."] * batch_n, dtype=object),
             "gold": np.array([None] * batch_n, dtype=object)}
    with s.phase("udf", phases) as rec:
        caller: Any = ray.remote(num_cpus=0.5)(Caller)  # Any: Ray's types do not follow an actor class through options
        actor = caller.remote(TOKENIZER, {"langid": load_task("langid")}, TeacherConfig(), [done_ref])
        t_init, t_call, out_ids = ray.get(actor.run.remote(batch))
        rec.update(actor_init_s=round(t_init, 3), call_s=round(t_call, 3), us_per_query=round(1e6 * t_call / batch_n, 1))
    assert out_ids == ids[half:], "the request UDF must skip exactly the finished samples"
    old = np.array([sample_key(f"{i:016x}", 0) for i in range(10_000)], dtype=object)
    old_bytes = sum(sys.getsizeof(k) for k in old) / len(old) + 8
    ray.kill(actor)
    return {"finished_samples": n_done, "array_bytes": int(nbytes), "bytes_per_sample": nbytes / n,
            "zero_copy_in_actor": not writeable, "files": len(list(folder.glob("*.parquet"))),
            "old_object_array_bytes_per_sample": round(old_bytes, 1)}


def array_facts(refs: list[Any]) -> tuple[int, bool]:
    """In a worker: the ledger array's size, and whether it is a read-only (zero-copy) view."""
    import ray

    array = ray.get(refs[0])
    return array.nbytes, array.flags.writeable


class Caller:
    """The request UDF as Ray Data runs it: constructed with the ledger's ref, then called."""

    def __init__(self, model_path: str, tasks: Any, cfg: Any, done_ref: Any):
        from raydistill.teacher.requests import TeacherRequests

        t0 = time.perf_counter()
        self.udf = TeacherRequests(model_path=model_path, tasks=tasks, cfg=cfg, done_ref=done_ref)
        self.t_init = time.perf_counter() - t0

    def run(self, batch: dict[str, np.ndarray]) -> tuple[float, float, list[str]]:
        t0 = time.perf_counter()
        out = self.udf(batch)
        return self.t_init, time.perf_counter() - t0, list(out["id"])


def run_train(n: int, work: Path, s: Sampler, phases: dict[str, Any]) -> dict[str, Any]:
    import ray

    from raydistill.config import load_config
    from raydistill.storage import location
    from raydistill.student.train import check_samples, example_datasets
    from raydistill.tasks.task import load_task

    extra: dict[str, Any] = {}
    folder = samples_files(work, n)
    with s.phase("check_samples", phases):
        valid = check_samples(folder, ["langid"])
    assert valid == {"langid": n}
    cfg = load_config(REPO / "raydistill" / "configs" / "demo_cpu.yaml", ["train.val_fraction=0.0"])
    if n <= LIMITS[("train", "examples")][0]:
        with s.phase("examples", phases) as rec:
            train_ds, _, n_examples, _, _ = example_datasets(cfg, location(folder), TOKENIZER, {"langid": load_task("langid")})
            rec["examples"] = n_examples
        lengths = [len(x) for x in train_ds.take_batch(2_000, batch_format="numpy")["input_ids"]]
        extra["example_tokens_mean"] = float(np.mean(lengths))
        (work / "example_lengths.json").write_text(json.dumps(lengths))
        del train_ds
    if n <= LIMITS[("train", "epoch")][0]:
        lengths_file = work / "example_lengths.json"
        lengths = json.loads(lengths_file.read_text()) if lengths_file.exists() else [120]
        ds = ray.data.range(n, override_num_blocks=max(8, n // 20_000)).map_batches(
            functools.partial(synthetic_examples, lengths=lengths), batch_format="numpy").materialize()
        with s.phase("epoch", phases) as rec:
            shards = ds.streaming_split(2, equal=True)
            consumer: Any = ray.remote(num_cpus=0.5)(ShardConsumer)
            consumers = [consumer.remote() for _ in shards]
            seen = ray.get([c.epoch.remote(shard, cfg.train.batch_size_per_worker) for c, shard in zip(consumers, shards)])
            rec["examples_seen"] = sum(seen)
    return extra


def synthetic_examples(batch: dict[str, np.ndarray], lengths: list[int]) -> dict[str, Any]:
    """Example rows shaped like ExampleBuilder's (ragged int64 input_ids/labels of its lengths)."""
    rng = np.random.default_rng(int(batch["id"][0]))
    ids, labels = np.empty(len(batch["id"]), object), np.empty(len(batch["id"]), object)
    for i, length in enumerate(rng.choice(lengths, len(batch["id"]))):
        ids[i] = rng.integers(0, 49_000, length, dtype=np.int64)
        labels[i] = np.where(np.arange(length) < length - 6, -100, ids[i])
    return {"id": batch["id"].astype(str).astype(object), "task": np.full(len(ids), "langid", object),
            "input_ids": ids, "labels": labels, "val": np.zeros(len(ids), bool)}


class ShardConsumer:
    """A train worker's data side: one epoch of its shard as ``loop.micro_batches`` reads it, collated."""

    def epoch(self, shard: Any, size: int) -> int:
        from raydistill.student.examples import bucket_batches, collate
        from raydistill.student.loop import BUCKET_BATCHES

        rng = np.random.default_rng(0)
        seen = 0
        for chunk in shard.iter_batches(batch_size=size * BUCKET_BATCHES, batch_format="numpy",
                                        local_shuffle_buffer_size=4 * size * BUCKET_BATCHES, local_shuffle_seed=0):
            for batch in bucket_batches(chunk, size, rng):
                collate(batch, 0)
                seen += len(batch["input_ids"])
        return seen


def run_evaluate(n: int, work: Path, s: Sampler, phases: dict[str, Any]) -> dict[str, Any]:
    import tempfile

    from raydistill.evaluate.evaluate import analyze, collect_stats, merge_stats
    from raydistill.evaluate.report import write_report
    from raydistill.storage import location

    folder = result_files(work, n)
    labels = ["ar", "de", "el", "en", "es", "fr", "hi", "ru", "tr", "ur", "vi", "zh", "ot"]
    systems = ["teacher", "student"]
    with s.phase("collect", phases):
        stats = collect_stats(location(folder))
    with s.phase("analyze_report", phases):
        summary = analyze(merge_stats(stats.values()), labels, systems)
        per_task = {k: analyze(v, labels, systems) for k, v in stats.items()}
        with tempfile.TemporaryDirectory() as tmp:
            write_report(Path(tmp), stage_times=None, **summary.pop("_report"))
    rows = sum(m["requests"] for m in summary["systems"].values())
    assert rows == n, (rows, n)
    return {"rows": rows, "tasks": sorted(str(k) for k in per_task), "agreement": summary["student_teacher_agreement"],
            "latency_p95_s": summary["systems"]["student"]["latency_p95_s"],
            "files": sum(1 for _ in folder.rglob("*.parquet"))}


RUNNERS: dict[str, Callable[[int, Path, Sampler, dict[str, Any]], dict[str, Any]]] = {"queries-jsonl": functools.partial(run_queries, "jsonl", False),
           "queries-parquet": functools.partial(run_queries, "parquet", False),
           "queries-dedup": functools.partial(run_queries, "jsonl", True), "ledger": run_ledger, "train": run_train, "evaluate": run_evaluate}


def child(path: str, n: int, work: Path, out: Path) -> None:
    import logging

    import ray

    from raydistill.runtime import local_worker_env

    logging.basicConfig(level=logging.WARNING)
    sampler = Sampler()
    sampler.start()
    phases: dict[str, Any] = {}
    with sampler.phase("ray_init", phases):
        ray.init(address="local", num_cpus=CPUS, include_dashboard=False, _node_ip_address="127.0.0.1",
                 object_store_memory=OBJECT_STORE, runtime_env={"env_vars": local_worker_env(0)}, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
    t0 = time.perf_counter()
    extra = RUNNERS[path](n, work, sampler, phases)
    wall = time.perf_counter() - t0
    ray.shutdown()
    sampler.stop.set()
    out.write_text(json.dumps({"path": path, "rows": n, "wall_s": round(wall, 2), "phases": phases, **extra}))


# ---------------------------------------------------------------- the orchestrator

def fit(sizes: list[int], values: list[float], digits: int, scale: float = 1.0) -> float | None:
    """Least-squares slope of values against rows (per row), times ``scale``, rounded (None below two sizes)."""
    if len(sizes) < 2:
        return None
    return round(scale * float(np.polyfit(np.asarray(sizes, float), np.asarray(values, float), 1)[0]), digits)


def growth(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per path and phase: time per row, driver and worker memory slopes, and the driver ratio."""
    out: dict[str, Any] = {}
    for path in PATHS:
        runs = sorted((r for r in results if r["path"] == path), key=lambda r: r["rows"])
        phases = sorted({p for r in runs for p in r["phases"] if p != "ray_init"})
        for phase in phases:
            pts = [(r["rows"], r["phases"][phase]) for r in runs if phase in r["phases"]]
            sizes = [n for n, _ in pts]
            out[f"{path}/{phase}"] = {
                "sizes": sizes,
                "us_per_row": fit(sizes, [rec["wall_s"] for _, rec in pts], 3, scale=1e6),
                "driver_bytes_per_row": fit(sizes, [rec["driver_peak_rss_mb"] * 2**20 for _, rec in pts], 3),
                "largest_worker_bytes_per_row": fit(sizes, [max(rec["worker_peak_rss_mb"].values(), default=0) * 2**20
                                                            for _, rec in pts], 2),
            }
    return out


def driver_peak(run: dict[str, Any]) -> float:
    """A run's driver peak over its measured phases (ray_init excluded: it is the same at every size)."""
    return max(rec["driver_peak_rss_mb"] for name, rec in run["phases"].items() if name != "ray_init")


def ratios(results: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path in PATHS:
        by_size = {r["rows"]: driver_peak(r) for r in results if r["path"] == path}
        if 10**5 not in by_size:
            continue
        largest = max(by_size)
        out[path] = {"driver_rss_1e7_over_1e5": round(by_size[10**7] / by_size[10**5], 3) if 10**7 in by_size else None,
                     "driver_rss_largest_over_1e5": round(by_size[largest] / by_size[10**5], 3), "largest": largest}
    return out


def write_md(data: dict[str, Any], path: Path) -> None:
    lines = [
        "# Scale bench: the paths around the engines at 10^4 .. 10^7 rows (issue 18)", "",
        f"`{data['command']}` at {data['commit']}, {data['machine']}; bench wall time {data['bench_wall_s'] / 60:.1f} min.",
        "Each path and size ran in a fresh driver process with its own local Ray cluster "
        f"({CPUS} logical CPUs, {OBJECT_STORE >> 30} GiB object store). RSS was sampled every 0.2 s; a worker kind is "
        "named by its process title; a worker's RSS counts the object-store pages it touched (shared).", "",
        "The engine is not run at scale: on 2 CPU cores vLLM labels ~10-14 queries/s, so 10^7 queries would take "
        "~10 days. What is measured is everything around it; `docs/scale.md` models the engine stages.", "",
        "## Driver peak RSS (MB) per path and size", "",
        "| path | " + " | ".join(f"{n:.0e}" for n in data["sizes"]) + " | 1e7 / 1e5 |",
        "|---|" + "---:|" * (len(data["sizes"]) + 1),
    ]
    for p in PATHS:
        runs = {r["rows"]: r for r in data["runs"] if r["path"] == p}
        ratio = data["ratios"].get(p, {})
        shown = ratio.get("driver_rss_1e7_over_1e5") or (f"{ratio.get('driver_rss_largest_over_1e5')} (to {ratio.get('largest'):.0e})"
                                                          if ratio else "")
        lines.append(f"| {p} | " + " | ".join(f"{driver_peak(runs[n]):.0f}" if n in runs else "—" for n in data["sizes"]) + f" | {shown} |")
    lines += ["", "## Per phase: wall time, driver peak, largest worker peak", "",
              "| path / phase | rows | wall (s) | driver peak (MB) | largest worker (kind: MB) |", "|---|---:|---:|---:|---|"]
    for r in data["runs"]:
        for name, rec in r["phases"].items():
            if name == "ray_init":
                continue
            kinds = rec["worker_peak_rss_mb"]
            top = max(kinds.items(), key=lambda kv: kv[1]) if kinds else ("—", 0)
            lines.append(f"| {r['path']} / {name} | {r['rows']:,} | {rec['wall_s']:.1f} | {rec['driver_peak_rss_mb']:.0f} | "
                         f"{top[0]}: {top[1]:.0f} |")
    lines += ["", "## Growth (least squares over the sizes run)", "",
              "| path / phase | sizes | time per row (µs) | driver bytes per row | largest worker bytes per row |", "|---|---|---:|---:|---:|"]
    for key, g in data["growth"].items():
        lines.append(f"| {key} | {', '.join(f'{n:.0e}' for n in g['sizes'])} | {g['us_per_row']} | {g['driver_bytes_per_row']} | "
                     f"{g['largest_worker_bytes_per_row']} |")
    lines += ["", "## Not run, and why", ""] + [f"- {p} / {ph} above {n:.0e}: {why}{took(data, p, ph, n)}"
                                                for (p, ph), (n, why) in LIMITS.items()]
    lines += [f"- {p} below {n:.0e}: skipped to keep the bench under 40 minutes" for p, n in PATH_MIN.items()]
    lines += [f"- {f['path']} at {f['rows']:.0e} FAILED: {f['why'][:300]}" for f in data["failed"]]
    ledger = [r for r in data["runs"] if r["path"] == "ledger"]
    if ledger:
        big = max(ledger, key=lambda r: r["rows"])
        lines += ["", "## Ledger", "",
                  f"- {big['finished_samples']:,} finished samples: a sorted uint64 array of {big['array_bytes'] / 2**20:.1f} MiB "
                  f"({big['bytes_per_sample']:.1f} bytes a sample) in the object store, read zero-copy by the request actor: "
                  f"{big['zero_copy_in_actor']}; a Python `str` key in the old object array took "
                  f"{big['old_object_array_bytes_per_sample']} bytes a sample.",
                  f"- reading the keys: {big['phases']['read_keys']['wall_s']:.1f} s; the request UDF's start "
                  f"{big['phases']['udf']['actor_init_s']:.2f} s and {big['phases']['udf']['us_per_query']} µs a query "
                  "(prompt rendering included), 2,000 queries half done."]
    lines += ["", "Raw numbers, worker kinds included: `bench/results/scale.json`.", ""]
    path.write_text("\n".join(lines))


def run_child(path: str, n: int, work: Path, result: Path) -> str | None:
    """One path at one size in a fresh process (its own session, so a timeout ends its Ray too)."""
    proc = subprocess.Popen([sys.executable, __file__, "--child", path, str(n), "--work", str(work), "--child-out", str(result)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return f"over {CHILD_TIMEOUT_S} s"
    if proc.returncode == 0:
        return None
    tail = err[err.rfind("Traceback"):] if "Traceback" in err else err  # the error, not Ray's exit chatter
    return f"exit {proc.returncode}: {tail.strip()[-1500:]}"


def make_data(path: str, n: int, work: Path) -> None:
    """The path's input, written here before its driver starts (so the driver's RSS is the path's alone)."""
    if path.startswith("queries"):
        query_files(work, n, "parquet" if path == "queries-parquet" else "jsonl")
    elif path in ("ledger", "train"):
        samples_files(work, n)
    else:
        result_files(work, n)


def took(data: dict[str, Any], path: str, phase: str, n: int) -> str:
    """' (x s at n in this run)' where the run has it."""
    walls = [r["phases"][phase]["wall_s"] for r in data["runs"] if r["path"] == path and r["rows"] == n and phase in r["phases"]]
    return f" ({walls[0]:.0f} s at {n:.0e} in this run)" if walls else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(str(n) for n in SIZES))
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--work", default="/tmp/rd/scale", help="generated data (kept between runs; large)")
    parser.add_argument("--out", default=str(RESULTS / "scale"))
    parser.add_argument("--child", nargs=2, metavar=("PATH", "ROWS"), help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.work)
    if args.child:
        child(args.child[0], int(args.child[1]), work, Path(args.child_out))
        return
    started = time.time()
    work.mkdir(parents=True, exist_ok=True)
    sizes = [int(float(x)) for x in args.sizes.split(",")]
    runs: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    for path in args.paths.split(","):
        for n in sizes:
            result = work / f"result-{path}-{n}.json"
            t0 = time.time()
            if n > PATH_MAX.get(path, n) or n < PATH_MIN.get(path, n):
                continue  # the path's only phase stops below n (LIMITS says why)
            make_data(path, n, work)
            failure = run_child(path, n, work, result)
            if failure:  # recorded, and the md says so; the other runs go on
                failed.append({"path": path, "rows": n, "why": failure})
                print(f"{path:9s} {n:>10,}: FAILED {failure[:300]}", flush=True)  # noqa: T201
                continue
            run = json.loads(result.read_text())
            run["process_wall_s"] = round(time.time() - t0, 1)
            runs.append(run)
            print(f"{path:9s} {n:>10,}: {run['wall_s']:7.1f} s (process {run['process_wall_s']} s), driver peak "  # noqa: T201
                  f"{driver_peak(run):.0f} MB", flush=True)
    data = {
        "command": "flock /tmp/rd/cpu.lock scripts/loopback-only .venv/bin/python bench/scale_bench.py"
                   + ("" if args.sizes == ",".join(map(str, SIZES)) else f" --sizes {args.sizes}")
                   + ("" if args.paths == ",".join(PATHS) else f" --paths {args.paths}"),
        "commit": git_commit(), "machine": f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}",
        "sizes": sizes, "bench_wall_s": round(time.time() - started, 1), "runs": runs, "failed": failed,
        "ratios": ratios(runs), "growth": growth(runs),
        "limits": {f"{p}/{ph}": {"max_rows": n, "why": why} for (p, ph), (n, why) in LIMITS.items()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    write_md(data, out.with_suffix(".md"))
    print(out.with_suffix(".md").read_text())  # noqa: T201


if __name__ == "__main__":
    main()
