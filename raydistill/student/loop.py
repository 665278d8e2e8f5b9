"""The per-worker training loop: DeepSpeed ZeRO + PEFT on a Ray Data shard.

Ray Train has already set up torch.distributed (gloo on CPU, NCCL on GPU) when this runs;
DeepSpeed picks that process group up. Only rank 0 logs and writes the exported student.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

MLFLOW_EXPERIMENT = "raydistill"
# Batches per length-sorted bucket: larger buckets pad less but mix lengths across steps less.
BUCKET_BATCHES = 16


def deepspeed_config(train: dict[str, Any], hidden_size: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config for one run (pure). The optimizer is a client AdamW: a DeepSpeed
    "optimizer" block would JIT-compile CPU Adam for minutes on CPU machines.

    With the model's ``hidden_size``, ZeRO-3's buffers are sized to the model (the rule
    transformers' Trainer applies for "auto"). DeepSpeed's defaults are fixed: a 5e8-element
    reduce bucket alone is 2 GB in fp32 per rank, more than a small student's whole state.

    The reuse distance matters most: ZeRO-3 keeps a gathered parameter whenever it is used again
    within that many elements of the trace. The default (1e9) exceeds a whole forward+backward of
    any model under ~0.5B parameters, so no layer is released before its backward and every rank
    holds the whole model at the end of the forward. About one decoder layer (10·hidden²)
    releases each layer once it has run."""
    zero: dict[str, Any] = {"stage": train["zero_stage"]}
    if hidden_size and train["zero_stage"] == 3:
        h2 = hidden_size * hidden_size
        zero.update(reduce_bucket_size=h2, stage3_prefetch_bucket_size=int(0.9 * h2),
                    stage3_param_persistence_threshold=10 * hidden_size,
                    stage3_max_live_parameters=10 * h2, stage3_max_reuse_distance=10 * h2)
    return {
        "train_micro_batch_size_per_gpu": train["batch_size_per_worker"],
        "gradient_accumulation_steps": train["gradient_accumulation_steps"],
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "bf16": {"enabled": train["dtype"] == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def lr_schedule(optimizer: Any, total_steps: int, warmup_ratio: float) -> Any:
    """Linear warmup, then cosine decay to 10% of the peak rate (transformers' schedule)."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=int(warmup_ratio * total_steps), num_training_steps=total_steps, min_lr_rate=0.1)


MOE_BLOCK = re.compile(r"(Sparse)?Mo[Ee](Block|Layer)$")  # Qwen2/3-MoE, Mixtral, OLMoE, ... blocks


def moe_block_classes(model: Any) -> list[type]:
    """The mixture-of-experts block classes in ``model`` (none for a dense model)."""
    return sorted({type(m) for m in model.modules() if MOE_BLOCK.search(type(m).__name__)}, key=lambda c: c.__name__)


def mark_moe_leaves(model: Any) -> list[type]:
    """Under ZeRO-3, MoE blocks must be leaf modules: ranks route tokens to different experts, so
    per-expert parameter gathering falls out of step across ranks and training hangs (DeepSpeed
    issue 7461). A leaf block gathers all its experts' parameters when it is entered."""
    classes = moe_block_classes(model)
    if classes:
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, classes)
    return classes


def build_model(model_path: str, train: dict[str, Any]) -> Any:
    """The student, loaded in the training dtype and in training mode. Under ZeRO-3 the weights
    are partitioned as they load (``deepspeed.zero.Init`` through transformers' DeepSpeed
    integration), so no rank ever holds the whole model: without it every worker would first
    materialise all of it."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    dtype = torch.bfloat16 if train["dtype"] == "bf16" else torch.float32
    # transformers keeps only a weak reference: the object must stay alive while loading.
    zero3 = HfDeepSpeedConfig(deepspeed_config(train)) if train["zero_stage"] == 3 else None
    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        if zero3 is not None:
            mark_moe_leaves(model)
        # from_pretrained returns the model in eval mode, and neither PEFT nor DeepSpeed changes
        # that for the layers: gradient checkpointing and LoRA dropout act only in train mode.
        model.train()
        model.config.use_cache = False
        if train["gradient_checkpointing"]:
            # Non-reentrant: works with frozen inputs (LoRA) and with ZeRO-3's parameter hooks.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if train["method"] == "full":
            return model
        from peft import LoraConfig, get_peft_model

        targets = train["lora_target_modules"]
        lora = LoraConfig(
            r=train["lora_rank"],
            lora_alpha=train["lora_alpha"],
            lora_dropout=train["lora_dropout"],
            target_modules="all-linear" if targets == ["all-linear"] else targets,
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, lora)
    finally:
        if zero3 is not None:
            # Later loads (the rank-0 merge at export) must be plain, not collective.
            unset_hf_deepspeed_config()


def build_engine(model_path: str, train: dict[str, Any], total_steps: int) -> tuple[Any, Any]:
    """Student + client AdamW + warmup/cosine schedule, wrapped by DeepSpeed. Needs an initialised
    torch.distributed group (Ray Train's, or any other) and nothing from Ray."""
    import deepspeed
    import torch

    model = build_model(model_path, train)
    params = [p for p in model.parameters() if p.requires_grad]
    # Fused: the unfused update allocates sqrt/div temporaries the size of each parameter, and
    # under ZeRO-3 the "parameter" is a rank's whole flat partition (one transient copy per term).
    optimizer = torch.optim.AdamW(params, lr=train["learning_rate"], weight_decay=train["weight_decay"], fused=True)
    scheduler = lr_schedule(optimizer, total_steps, train["warmup_ratio"])
    hidden = getattr(model.config, "hidden_size", None)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(train, hidden))
    if train["zero_stage"] == 3 and (freed := share_zero3_master_weights(engine.optimizer)):
        logger.info("ZeRO-3: fp32 master shares the partition's storage (%.0f MB freed on this rank)", freed / 2**20)
    return engine, scheduler


def share_zero3_master_weights(zero3_optimizer: Any) -> int:
    """Let ZeRO-3's fp32 master partition use the storage of the training-dtype partition when
    both are the same fp32 tensor; returns the bytes freed.

    DeepSpeed 0.19 means to share them (the autocast branch of ``_create_fp32_partitions``) but
    tests ``partition.device == self.device`` against the *string* device name, which is never
    equal to a ``torch.device``, so in fp32 training it clones every partition: 20 bytes per
    parameter per rank instead of 16. Sharing is what DeepSpeed does when the test succeeds;
    after each step it copies master into partition, a no-op on shared storage. Nothing happens
    with bf16 (a real fp32 master is needed) or once DeepSpeed shares them itself."""
    freed = 0
    low = getattr(zero3_optimizer, "fp16_partitioned_groups_flat", None) or []
    master = getattr(zero3_optimizer, "fp32_partitioned_groups_flat", None) or []
    for part, fp32 in zip(low, master):
        same_kind = part is not None and part.dtype == fp32.dtype and part.shape == fp32.shape and part.device == fp32.device
        if same_kind and part.data_ptr() != fp32.data_ptr():
            fp32.data = part.data  # the optimizer keys its state on this object: keep it, swap its storage
            freed += fp32.numel() * fp32.element_size()
    return freed


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _to_device(arrays: dict[str, np.ndarray], device: Any) -> dict[str, Any]:
    import torch

    return {k: torch.from_numpy(v).to(device) for k, v in arrays.items()}


def train_step(engine: Any, batch: dict[str, np.ndarray], pad_id: int, kl_weight: float) -> tuple[float, int]:
    """One micro-batch through a DeepSpeed engine: forward, backward, and the optimizer step
    (DeepSpeed applies it only at gradient-accumulation boundaries). Returns the loss and the
    number of real (unpadded) tokens. Free of Ray, so GPU checks run it as it is."""
    from raydistill.student.examples import collate
    from raydistill.student.loss import answer_only_loss

    arrays = collate(batch, pad_id)
    loss = answer_only_loss(engine.module, **_to_device(arrays, engine.device), kl_weight=kl_weight)
    engine.backward(loss)
    engine.step()
    return float(loss.detach()), int(arrays["attention_mask"].sum())


def evaluate_loss(engine: Any, shard: Any, train: dict[str, Any], pad_id: int) -> float | None:
    """Mean answer-token loss over the validation split, summed across workers."""
    import torch
    import torch.distributed as dist

    from raydistill.student.examples import collate
    from raydistill.student.loss import answer_only_loss

    total = torch.zeros(2, dtype=torch.float64)
    engine.eval()
    with torch.no_grad():
        for batch in shard.iter_batches(batch_size=train["batch_size_per_worker"], batch_format="numpy"):
            inputs = _to_device(collate(batch, pad_id), engine.device)
            loss = answer_only_loss(engine.module, **inputs, kl_weight=train["kl_weight"])
            total += torch.tensor([float(loss) * len(batch["input_ids"]), len(batch["input_ids"])], dtype=torch.float64)
    engine.train()
    if dist.is_initialized():
        dist.all_reduce(total)
    return float(total[0] / total[1]) if total[1] > 0 else None


def save_checkpoint(engine: Any, loop_state: dict[str, Any], metrics_path: Path, rank: int) -> Any:
    """Every rank writes its DeepSpeed shard into its own folder; Ray Train merges the folders
    of all ranks into one checkpoint in run storage. LoRA checkpoints skip the frozen base."""
    import tempfile

    from ray.train import Checkpoint

    folder = Path(tempfile.mkdtemp(prefix="raydistill-ckpt-"))
    engine.save_checkpoint(str(folder), tag="ds", exclude_frozen_parameters=loop_state["lora"])
    if rank == 0:
        (folder / "loop_state.json").write_text(json.dumps(loop_state))
        if metrics_path.is_file():
            (folder / "metrics.jsonl").write_bytes(metrics_path.read_bytes())
    return Checkpoint.from_directory(str(folder))


def restore(engine: Any, checkpoint: Any, metrics_path: Path, rank: int) -> dict[str, Any]:
    """Load model, optimizer and scheduler state; return the loop state saved with them."""
    with checkpoint.as_directory() as folder:
        loaded, _ = engine.load_checkpoint(folder, tag="ds", load_module_strict=False)
        if loaded is None:
            raise RuntimeError(f"no DeepSpeed state in checkpoint {folder}; delete <run_dir>/ray_train to start over")
        state = json.loads(Path(folder, "loop_state.json").read_text())
        if rank == 0 and Path(folder, "metrics.jsonl").is_file():
            metrics_path.write_bytes(Path(folder, "metrics.jsonl").read_bytes())
    return state


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import deepspeed
    import ray.train
    import torch

    from raydistill.student.examples import bucket_batches

    train: dict[str, Any] = loop_config["train"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    if rank == 0:  # worker processes start without the CLI's logging setup
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.manual_seed(train["seed"] + rank)
    if not train["use_gpu"]:
        torch.set_num_threads(max(1, int(train["cpus_per_worker"])))
    # The shm comm op would be JIT-compiled (~2 min) at init; gloo/NCCL is all we need.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

    rss_before_model = _rss_mb()
    total_steps = loop_config["total_steps"]
    engine, scheduler = build_engine(loop_config["model_path"], train, total_steps)
    memory = {"rss_before_model_mb": rss_before_model, "rss_after_engine_mb": _rss_mb(), "peak_rss_engine_mb": _peak_rss_mb()}
    metrics_path = Path(loop_config["metrics_path"])
    step, first_epoch, tokens = 0, 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a retried worker group, or a re-run of a killed driver
        state = restore(engine, checkpoint, metrics_path, rank)
        step, first_epoch, tokens = state["step"], state["epoch"], state["tokens_worker"]
        if rank == 0:
            logger.info("resumed from the checkpoint at step %d/%d", step, total_steps)

    tracker = None
    if train["tracking"] == "mlflow" and rank == 0:
        from ray.air.integrations.mlflow import setup_mlflow

        # One MLflow run per worker-group start: a resumed run continues in a new MLflow run.
        tracker = setup_mlflow(config=train, tracking_uri=loop_config["mlflow_tracking_uri"], experiment_name=MLFLOW_EXPERIMENT,
                               create_experiment_if_not_exists=True,
                               tags={"run_dir": loop_config["run_dir"], "resumed_from_step": str(step)},
                               rank_zero_only=True)
    shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if loop_config["has_val"] else None
    pad_id = loop_config["pad_token_id"]
    started, resumed_at, tokens_at_start, micro = time.time(), step, tokens, 0
    losses: list[float] = []
    row: dict[str, Any] = {}
    for epoch in range(first_epoch, train["epochs"]):
        if step >= total_steps:
            break
        # After a resume the epoch restarts as a fresh shuffle: the optimizer, schedule and step
        # count continue exactly; which examples the rest of the epoch sees is resampled.
        rng = np.random.default_rng(train["seed"] * 1000 + epoch + 7919 * resumed_at)
        chunks = shard.iter_batches(
            batch_size=train["batch_size_per_worker"] * BUCKET_BATCHES, batch_format="numpy",
            local_shuffle_buffer_size=4 * train["batch_size_per_worker"] * BUCKET_BATCHES,
            local_shuffle_seed=train["seed"] + epoch + resumed_at,
        )
        for batch in (b for chunk in chunks for b in bucket_batches(chunk, train["batch_size_per_worker"], rng)):
            loss, batch_tokens = train_step(engine, batch, pad_id, train["kl_weight"])
            micro += 1
            if micro == 1:  # activations, gradients and optimizer state now all exist once
                memory.update(rss_after_first_step_mb=_rss_mb(), peak_rss_first_step_mb=_peak_rss_mb())
            tokens += batch_tokens
            losses.append(loss)
            if micro % train["gradient_accumulation_steps"]:
                continue
            step += 1
            last = step >= total_steps
            evaluate_now = val_shard is not None and (last or (train["eval_every"] and step % train["eval_every"] == 0))
            checkpoint_now = bool(train["checkpoint_every"]) and step % train["checkpoint_every"] == 0 and not last
            if not (step % train["log_every"] == 0 or last or evaluate_now or checkpoint_now):
                continue
            elapsed = time.time() - started
            row = {
                "step": step, "epoch": epoch, "loss": sum(losses) / len(losses) if losses else None,
                "lr": scheduler.get_last_lr()[0], "tokens_per_s_worker": (tokens - tokens_at_start) / elapsed,
                "elapsed_s": round(elapsed, 2), "peak_rss_mb": round(_peak_rss_mb(), 1), "rss_mb": round(_rss_mb(), 1),
            }
            losses.clear()
            if evaluate_now:
                row["eval_loss"] = evaluate_loss(engine, val_shard, train, pad_id)
            if rank == 0:
                logger.info("step %d/%d loss %.4f%s lr %.2e %.0f tokens/s/worker", step, total_steps, row["loss"] or 0.0,
                            f" eval_loss {row['eval_loss']:.4f}" if row.get("eval_loss") is not None else "",
                            row["lr"], row["tokens_per_s_worker"])
                with metrics_path.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                if tracker is not None:
                    tracker.log_metrics({k: v for k, v in row.items() if isinstance(v, float)}, step=step)
            if checkpoint_now:
                state = {"step": step, "epoch": epoch, "tokens_worker": tokens, "lora": train["method"] == "lora"}
                saved = save_checkpoint(engine, state, metrics_path, rank)
                ray.train.report(row, checkpoint=saved)
                shutil.rmtree(saved.path, ignore_errors=True)  # persisted to run storage by now
            else:
                ray.train.report(row)
            if last:
                break

    train_wall = time.time() - started
    if tracker is not None:
        tracker.end_run()
    peak_train = _peak_rss_mb()  # before the export, which gathers and reloads whole models
    export(engine, loop_config, rank)
    if rank == 0:
        peak = _peak_rss_mb()
        summary = {"steps": step, "resumed_from_step": resumed_at, "tokens_worker0": tokens,
                   "wall_time_s": round(time.time() - started, 2), "final_eval_loss": row.get("eval_loss"),
                   "train_wall_s": round(train_wall, 2),
                   "tokens_per_s_worker0": round((tokens - tokens_at_start) / max(1e-9, train_wall), 2),
                   "peak_rss_mb_worker0": round(peak, 1), "peak_rss_above_start_mb_worker0": round(peak - rss_before_model, 1),
                   "peak_rss_training_mb_worker0": round(peak_train, 1),
                   "peak_rss_training_above_start_mb_worker0": round(peak_train - rss_before_model, 1),
                   "memory_phases_mb_worker0": {k: round(v, 1) for k, v in memory.items()}}
        Path(loop_config["export_dir"], "train_summary.json").write_text(json.dumps(summary))


def export(engine: Any, loop_config: dict[str, Any], rank: int) -> None:
    """Write the adapter (LoRA) and the merged HF model from rank 0; all ranks join any gather."""
    import deepspeed
    import torch

    train = loop_config["train"]
    out = Path(loop_config["export_dir"])
    model = engine.module
    if train["method"] == "full":
        state = engine._zero3_consolidated_16bit_state_dict() if train["zero_stage"] == 3 else model.state_dict()
        if rank == 0:
            model.save_pretrained(out / "merged", state_dict=state, safe_serialization=True)
        return
    trainable = [p for p in model.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None, enabled=train["zero_stage"] == 3):
        if rank == 0:
            from peft import get_peft_model_state_dict

            state = {k: v.detach().to(torch.float32).cpu() for k, v in get_peft_model_state_dict(model).items()}
            model.save_pretrained(out / "adapter", state_dict=state)
    if rank == 0:
        merge_adapter(loop_config["model_path"], out / "adapter", out / "merged")


def merge_adapter(base_path: str, adapter_dir: Path, merged_dir: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(merged_dir, safe_serialization=True)
    os.sync()
