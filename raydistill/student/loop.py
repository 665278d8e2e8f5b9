"""The per-worker training loop: DeepSpeed ZeRO + PEFT on a Ray Data shard.

Ray Train has already set up torch.distributed (gloo on CPU, NCCL on GPU) when this runs;
DeepSpeed picks that process group up. Only rank 0 logs and writes the exported student.
Here the pieces are wired to Ray Train: ``engine`` (the model and DeepSpeed), ``step`` (one
optimizer step, the eval loss), ``checkpoint``, ``memory`` (RSS probes) and ``export``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from raydistill.student.checkpoint import LoopState, report_with_checkpoint, restore
from raydistill.student.loop_config import LoopConfig
from raydistill.student.memory import MemoryPhases, peak_rss_mb, rss_mb

logger = logging.getLogger(__name__)

MLFLOW_EXPERIMENT = "raydistill"
# Batches per length-sorted bucket: larger buckets pad less but mix lengths across steps less.
BUCKET_BATCHES = 16

Batch = dict[str, np.ndarray]


@dataclasses.dataclass
class Worker:
    """One rank's run: its engine, its data, and where the loop stands."""

    cfg: LoopConfig
    rank: int
    engine: Any
    scheduler: Any
    shard: Any
    val_shard: Any  # None without a validation split
    tracker: Any  # the MLflow module on rank 0 with train.tracking=mlflow, else None
    memory: MemoryPhases
    resumed: LoopState  # where this worker group started: all zero unless restored from a checkpoint
    step: int = 0
    tokens: int = 0
    started: float = 0.0
    losses: list[float] = dataclasses.field(default_factory=list)  # micro-batch losses since the last row
    row: dict[str, Any] = dataclasses.field(default_factory=dict)  # the last reported row


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry on every worker: setup → train steps (evaluating and checkpointing on
    their schedules) → export."""
    worker = setup(LoopConfig.from_ray(config))
    train_wall = run_steps(worker)
    if worker.cfg.train.on_policy.steps:
        from raydistill.student.on_policy_loop import run_on_policy

        train_wall += run_on_policy(worker)
    finish(worker, train_wall)


def setup(cfg: LoopConfig) -> Worker:
    """This process, the engine, the checkpoint to resume from, tracking and the data shards."""
    import ray.train

    from raydistill.student.engine import build_engine

    rank = ray.train.get_context().get_world_rank()
    prepare_process(cfg, rank)
    memory = MemoryPhases()
    engine, scheduler = build_engine(cfg.model_path, cfg.train, cfg.total_steps)
    memory.after_engine()
    state = LoopState(lora=cfg.train.method == "lora")
    if rank == 0:
        cfg.export_dir.mkdir(parents=True, exist_ok=True)  # on this node; moved into run storage at the end
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a retried worker group, or a re-run of a killed driver
        state = restore(engine, checkpoint, cfg.metrics_path, rank)
        if rank == 0:
            logger.info("resumed from the checkpoint at step %d/%d", state.step, cfg.total_steps)
    tracker = start_tracking(cfg, rank, state.step)
    return Worker(cfg, rank, engine, scheduler, shard=ray.train.get_dataset_shard("train"),
                  val_shard=ray.train.get_dataset_shard("val") if cfg.has_val else None, tracker=tracker,
                  memory=memory, resumed=state, step=state.step, tokens=state.tokens_worker)


def prepare_process(cfg: LoopConfig, rank: int) -> None:
    """Logging on rank 0, seeds, CPU threads, and no JIT-built DeepSpeed comm op."""
    import torch

    from raydistill.student.engine import skip_shm_comm_build

    if rank == 0:  # worker processes start without the CLI's logging setup
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.manual_seed(cfg.train.seed + rank)
    if not cfg.train.use_gpu:
        torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    skip_shm_comm_build()


def start_tracking(cfg: LoopConfig, rank: int, step: int) -> Any:
    """MLflow on rank 0: one MLflow run per worker-group start, so a resumed run continues in a
    new MLflow run."""
    if cfg.train.tracking != "mlflow" or rank != 0:
        return None
    from ray.air.integrations.mlflow import setup_mlflow

    return setup_mlflow(config=cfg.train.model_dump(), tracking_uri=cfg.mlflow_tracking_uri,
                        experiment_name=MLFLOW_EXPERIMENT, create_experiment_if_not_exists=True,
                        tags={"run_dir": str(cfg.run_dir), "resumed_from_step": str(step)}, rank_zero_only=True)


def run_steps(w: Worker) -> float:
    """Off-policy optimizer steps up to ``off_policy_steps`` (or until the data runs out); returns the wall time."""
    from raydistill.student.step import optimizer_step

    train = w.cfg.train
    w.started = time.time()
    steps = optimizer_steps(micro_batches(w), train.gradient_accumulation_steps)
    for epoch, group in itertools.islice(steps, max(0, w.cfg.off_policy_steps - w.step)):
        for loss, tokens in optimizer_step(w.engine, group, w.cfg.pad_token_id, train.kl_weight):
            w.losses.append(loss)
            w.tokens += tokens
        if w.step == w.resumed.step:
            w.memory.after_first_step()
        w.step += 1
        end_of_step(w, epoch)
    return time.time() - w.started


def micro_batches(w: Worker) -> Iterator[tuple[int, Batch]]:
    """(epoch, micro-batch) over the remaining epochs: length-bucketed batches of the shuffled shard."""
    from raydistill.student.examples import bucket_batches

    train, resumed, size = w.cfg.train, w.resumed, w.cfg.train.batch_size_per_worker
    for epoch in range(resumed.epoch, train.epochs):
        # After a resume the epoch restarts as a fresh shuffle: the optimizer, schedule and step
        # count continue exactly; which examples the rest of the epoch sees is resampled.
        rng = np.random.default_rng(train.seed * 1000 + epoch + 7919 * resumed.step)
        chunks = w.shard.iter_batches(
            batch_size=size * BUCKET_BATCHES, batch_format="numpy", local_shuffle_buffer_size=4 * size * BUCKET_BATCHES,
            local_shuffle_seed=train.seed + epoch + resumed.step,
        )
        for chunk in chunks:
            for batch in bucket_batches(chunk, size, rng):
                yield epoch, batch


def optimizer_steps(micro: Iterator[tuple[int, Batch]], accumulation: int) -> Iterator[tuple[int, list[Batch]]]:
    """Micro-batches grouped by optimizer step. A group may span an epoch boundary; it counts
    in the epoch of its last micro-batch."""
    group: list[Batch] = []
    for epoch, batch in micro:
        group.append(batch)
        if len(group) == accumulation:
            yield epoch, group
            group = []


def end_of_step(w: Worker, epoch: int) -> None:
    """Log, evaluate and checkpoint on their schedules; every logged row goes to Ray Train."""
    import ray.train

    from raydistill.student.step import KL_KEY, evaluate_loss

    train, step = w.cfg.train, w.step
    last = step >= w.cfg.total_steps
    phase_end = step >= w.cfg.off_policy_steps  # the validation loss closes the off-policy steps too
    evaluate_now = w.val_shard is not None and (phase_end or bool(train.eval_every and step % train.eval_every == 0))
    checkpoint_now = bool(train.checkpoint_every) and step % train.checkpoint_every == 0 and not last
    if not (step % train.log_every == 0 or phase_end or evaluate_now or checkpoint_now):
        return
    w.row = metrics_row(w, epoch)
    if evaluate_now:
        w.row["eval_loss"], parts = evaluate_loss(w.engine, w.val_shard, train.batch_size_per_worker,
                                                  w.cfg.pad_token_id, train.kl_weight, w.cfg.tasks)
        if KL_KEY in parts:  # forward KL to the teacher's top-k on held-out queries (soft targets)
            w.row["eval_kl"] = parts.pop(KL_KEY)
        w.row.update({f"eval_loss/{key}": loss for key, loss in parts.items()})
    if w.rank == 0:
        log_row(w)
    if checkpoint_now:
        state = LoopState(step=step, epoch=epoch, tokens_worker=w.tokens, lora=train.method == "lora")
        report_with_checkpoint(w.engine, w.row, state, w.cfg.metrics_path, w.rank)
    else:
        ray.train.report(w.row)


def metrics_row(w: Worker, epoch: int) -> dict[str, Any]:
    """This step's metrics; the loss is the mean of the micro-batch losses since the last row."""
    elapsed = time.time() - w.started
    row = {
        "step": w.step, "epoch": epoch, "loss": sum(w.losses) / len(w.losses) if w.losses else None,
        "lr": w.scheduler.get_last_lr()[0], "tokens_per_s_worker": (w.tokens - w.resumed.tokens_worker) / elapsed,
        "elapsed_s": round(elapsed, 2), "peak_rss_mb": round(peak_rss_mb(), 1), "rss_mb": round(rss_mb(), 1),
    }
    w.losses.clear()
    return row


def log_row(w: Worker) -> None:
    """Rank 0: the log line, a line of metrics.jsonl, and MLflow."""
    row = w.row
    if row.get("phase") == "on_policy":
        logger.info("step %d/%d (on-policy) reverse KL %.4f/token%s lr %.2e; rollout %.1fs, scoring %.1fs, update %.1fs",
                    w.step, w.cfg.total_steps, row["reverse_kl"],
                    f" held-out {row['eval_reverse_kl']:.4f}" if row.get("eval_reverse_kl") is not None else "",
                    row["lr"], row["rollout_s"], row["score_s"], row["update_s"])
    else:
        logger.info("step %d/%d loss %.4f%s lr %.2e %.0f tokens/s/worker", w.step, w.cfg.total_steps, row["loss"] or 0.0,
                    f" eval_loss {row['eval_loss']:.4f}" if row.get("eval_loss") is not None else "",
                    row["lr"], row["tokens_per_s_worker"])
    with w.cfg.metrics_path.open("a") as fh:
        fh.write(json.dumps(row) + "\n")
    sync_metrics(w.cfg)
    if w.tracker is not None:
        w.tracker.log_metrics({k: v for k, v in row.items() if isinstance(v, float)}, step=w.step)


def finish(w: Worker, train_wall: float) -> None:
    """End tracking, export the student, and write rank 0's ``train_summary.json``."""
    from raydistill.student.export import export

    if w.tracker is not None:
        w.tracker.end_run()
    peak_train = peak_rss_mb()  # before the export, which gathers and reloads whole models
    export(w.engine, w.cfg.train, w.cfg.model_path, w.cfg.export_dir, w.rank)
    if w.rank == 0:
        summary = train_summary(w, train_wall, peak_train)
        (w.cfg.export_dir / "train_summary.json").write_text(json.dumps(summary))
        w.cfg.export.upload(w.cfg.export_dir)  # the student and its metrics into run storage, off this node


METRICS_SYNC_S = 10.0
_metrics_synced_at = 0.0


def sync_metrics(cfg: LoopConfig, *, force: bool = False) -> None:
    """Rank 0: copy metrics.jsonl into run storage at most every METRICS_SYNC_S (on an object
    store one small PUT), so the driver's progress line moves; the final copy goes with the export."""
    global _metrics_synced_at
    if not force and time.time() - _metrics_synced_at < METRICS_SYNC_S:
        return
    (cfg.export / "metrics.jsonl").write_bytes(cfg.metrics_path.read_bytes())
    _metrics_synced_at = time.time()


def train_summary(w: Worker, train_wall: float, peak_train: float) -> dict[str, Any]:
    peak, start = peak_rss_mb(), w.memory.start
    return {
        "steps": w.step, "resumed_from_step": w.resumed.step, "tokens_worker0": w.tokens,
        "wall_time_s": round(time.time() - w.started, 2), "final_eval_loss": w.row.get("eval_loss"),
        "final_eval_kl": w.row.get("eval_kl"),
        "train_wall_s": round(train_wall, 2),
        "tokens_per_s_worker0": round((w.tokens - w.resumed.tokens_worker) / max(1e-9, train_wall), 2),
        "peak_rss_mb_worker0": round(peak, 1), "peak_rss_above_start_mb_worker0": round(peak - start, 1),
        "peak_rss_training_mb_worker0": round(peak_train, 1),
        "peak_rss_training_above_start_mb_worker0": round(peak_train - start, 1),
        "memory_phases_mb_worker0": {k: round(v, 1) for k, v in w.memory.phases.items()},
        **on_policy_part(w),
    }


def on_policy_part(w: Worker) -> dict[str, Any]:
    """The on-policy steps' summary, from every row of metrics.jsonl (a resumed run's included)."""
    if not w.cfg.train.on_policy.steps:
        return {}
    from raydistill.student.on_policy_loop import on_policy_summary

    rows = [json.loads(line) for line in w.cfg.metrics_path.read_text().splitlines() if line.strip()]
    last_eval: dict[str, Any] = next((r for r in reversed(rows) if r.get("eval_loss") is not None), {})  # the off-policy steps' last
    return {"off_policy_steps": w.cfg.off_policy_steps, "final_eval_loss": last_eval.get("eval_loss"),
            "final_eval_kl": last_eval.get("eval_kl"), "on_policy": on_policy_summary(rows)}
