"""`raydistill train`: teacher samples → Ray Train (DeepSpeed ZeRO + PEFT) → student folders.

    ray job submit --working-dir . -- raydistill train jobs/configs/demo_cpu.yaml

Writes ``<run_dir>/student/{adapter,merged}/``, ``metrics.jsonl`` and ``_manifest.json``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from raydistill.config import PipelineConfig
from raydistill.errors import DataError
from raydistill.manifest import write_manifest
from raydistill.models import resolve_model
from raydistill.outputs import check_output, staged_output
from raydistill.runtime import init_ray
from raydistill.schema import SAMPLES, parquet_files, require_columns
from raydistill.student.examples import build_examples_batch
from raydistill.student.loop import train_loop_per_worker
from raydistill.tasks.task import load_task

logger = logging.getLogger(__name__)


class ExampleBuilder:
    """Ray Data UDF: tokenizer loaded once per actor, examples built by the pure core."""

    def __init__(self, model_path: str, task: Any, target: str, max_seq_len: int):
        from transformers import AutoTokenizer

        self.kwargs = {
            "tokenizer": AutoTokenizer.from_pretrained(model_path),
            "task": task,
            "target": target,
            "max_seq_len": max_seq_len,
        }

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return build_examples_batch(batch, **self.kwargs)


def check_samples(samples_dir: Path) -> int:
    """Fail early on a missing/foreign samples folder; return the number of valid rows."""
    if not samples_dir.is_dir() or not any(samples_dir.glob("*.parquet")):
        raise DataError(f"no teacher samples under {str(samples_dir)!r}; run `raydistill generate` first")
    schema = pq.read_schema(next(samples_dir.glob("*.parquet")))
    require_columns(schema.names, SAMPLES, f"samples in {str(samples_dir)!r}", "regenerate them with `raydistill generate`")
    valid = pq.read_table(parquet_files(samples_dir), columns=["valid"]).column("valid")
    n_valid = int(sum(valid.to_pylist()))
    if n_valid == 0:
        raise DataError(f"samples in {str(samples_dir)!r} hold no valid rows; check the teacher prompt/parser (see the generate manifest)")
    return n_valid


def plan_steps(n_examples: int, cfg: PipelineConfig) -> dict[str, int]:
    t = cfg.train
    per_step = t.num_workers * t.batch_size_per_worker * t.gradient_accumulation_steps
    # equal shards and drop_last: every worker sees floor(n / workers / batch) micro-batches
    micro_per_worker = (n_examples // t.num_workers) // t.batch_size_per_worker
    steps_per_epoch = micro_per_worker // t.gradient_accumulation_steps
    if steps_per_epoch == 0:
        raise DataError(
            f"{n_examples} training examples are fewer than one step ({per_step} = workers x batch x accumulation); "
            f"label more queries or lower train.batch_size_per_worker"
        )
    total = steps_per_epoch * t.epochs
    if t.max_steps:
        total = min(total, t.max_steps)
    return {"examples": n_examples, "effective_batch": per_step, "steps_per_epoch": steps_per_epoch, "total_steps": total}


def train(cfg: PipelineConfig, *, overwrite: bool = False) -> Path:
    started = time.time()
    run_dir = Path(cfg.run_dir).resolve()
    out_dir = check_output(run_dir / "student", overwrite=overwrite, what="student directory")
    samples_dir = run_dir / "samples"
    n_valid = check_samples(samples_dir)
    task = load_task(cfg.task.name)
    model_path = resolve_model(cfg.train.student_model)
    ray = init_ray(cfg.cluster)
    from ray.data.expressions import col
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    examples = (
        ray.data.read_parquet(parquet_files(samples_dir))
        .filter(expr=col("valid") == True)  # noqa: E712 - an expression, not a Python comparison
        .map_batches(
            ExampleBuilder,
            fn_constructor_kwargs={"model_path": model_path, "task": task, "target": cfg.train.target,
                                   "max_seq_len": cfg.train.max_seq_len},
            compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=0.5,
            batch_size=256,
        )
        .materialize()
    )
    n_examples = examples.count()
    plan = plan_steps(n_examples, cfg)
    logger.info(
        "train: %d valid samples -> %d examples (%d dropped > max_seq_len=%d); effective batch %d; "
        "%d steps/epoch; %d steps total; %d workers, ZeRO-%d, %s, %s",
        n_valid, n_examples, n_valid - n_examples, cfg.train.max_seq_len, plan["effective_batch"],
        plan["steps_per_epoch"], plan["total_steps"], cfg.train.num_workers, cfg.train.zero_stage,
        cfg.train.method, cfg.train.dtype,
    )
    with staged_output(out_dir) as tmp:
        loop_config = {
            "train": cfg.train.model_dump(),
            "model_path": model_path,
            "total_steps": plan["total_steps"],
            "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            "export_dir": str(tmp),
            "metrics_path": str(tmp / "metrics.jsonl"),
        }
        resources = {"CPU": cfg.train.cpus_per_worker}
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=loop_config,
            scaling_config=ScalingConfig(
                num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu, resources_per_worker=resources
            ),
            run_config=RunConfig(name="train", storage_path=str(run_dir / "ray_train")),
            datasets={"train": examples},
        )
        result = trainer.fit()
        if result.error:
            raise result.error
        tokenizer.save_pretrained(tmp / "merged")
        if cfg.train.method == "lora":
            tokenizer.save_pretrained(tmp / "adapter")
        summary = json.loads((tmp / "train_summary.json").read_text())
        losses = [json.loads(line)["loss"] for line in (tmp / "metrics.jsonl").read_text().splitlines()]
        counts = {**plan, **summary, "valid_samples": n_valid, "first_loss": losses[0] if losses else None,
                  "last_loss": losses[-1] if losses else None}
        write_manifest(tmp, stage="train", config=cfg.model_dump(),
                       inputs={"samples": str(samples_dir), "student_model": model_path, "task": task.name},
                       counts=counts, started=started)
    logger.info("train: wrote %s (loss %s -> %s)", out_dir, counts["first_loss"], counts["last_loss"])
    return out_dir

