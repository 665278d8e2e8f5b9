"""The per-worker training loop: DeepSpeed ZeRO + PEFT on a Ray Data shard.

Ray Train has already set up torch.distributed (gloo on CPU, NCCL on GPU) when this runs;
DeepSpeed picks that process group up. Only rank 0 logs and writes the exported student.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

# Batches per length-sorted bucket: larger buckets pad less but mix lengths across steps less.
BUCKET_BATCHES = 16


def deepspeed_config(train: dict[str, Any]) -> dict[str, Any]:
    """The DeepSpeed config for one run (pure). The optimizer is a client AdamW: a DeepSpeed
    "optimizer" block would JIT-compile CPU Adam for minutes on CPU machines."""
    return {
        "train_micro_batch_size_per_gpu": train["batch_size_per_worker"],
        "gradient_accumulation_steps": train["gradient_accumulation_steps"],
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": train["zero_stage"]},
        "bf16": {"enabled": train["dtype"] == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def lr_lambda(total_steps: int, warmup_steps: int):
    """Linear warmup, then cosine decay to 10% of the peak rate."""

    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return fn


def build_model(model_path: str, train: dict[str, Any]) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.config.use_cache = False
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


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import deepspeed
    import ray.train
    import torch

    from raydistill.student.examples import bucket_batches, collate
    from raydistill.student.loss import answer_only_loss

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

    model = build_model(loop_config["model_path"], train)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train["learning_rate"], weight_decay=train["weight_decay"])
    total_steps = loop_config["total_steps"]
    warmup = int(train["warmup_ratio"] * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, warmup))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(train)
    )

    shard = ray.train.get_dataset_shard("train")
    pad_id = loop_config["pad_token_id"]
    step, micro, tokens, started = 0, 0, 0, time.time()
    losses: list[float] = []
    metrics_path = Path(loop_config["metrics_path"])
    for epoch in range(train["epochs"]):
        rng = np.random.default_rng(train["seed"] * 1000 + epoch)
        chunks = shard.iter_batches(
            batch_size=train["batch_size_per_worker"] * BUCKET_BATCHES, batch_format="numpy",
            local_shuffle_buffer_size=4 * train["batch_size_per_worker"] * BUCKET_BATCHES,
            local_shuffle_seed=train["seed"] + epoch,
        )
        for batch in (b for chunk in chunks for b in bucket_batches(chunk, train["batch_size_per_worker"], rng)):
            arrays = collate(batch, pad_id)
            inputs = {k: torch.from_numpy(v).to(engine.device) for k, v in arrays.items()}
            loss = answer_only_loss(engine.module, **inputs)
            engine.backward(loss)
            engine.step()
            micro += 1
            tokens += int(arrays["attention_mask"].sum())
            losses.append(float(loss.detach()))
            if micro % train["gradient_accumulation_steps"]:
                continue
            step += 1
            if step % train["log_every"] == 0 or step == total_steps:
                row = {
                    "step": step,
                    "epoch": epoch,
                    "loss": sum(losses) / len(losses),
                    "lr": scheduler.get_last_lr()[0],
                    "tokens_per_s_worker": tokens / (time.time() - started),
                    "elapsed_s": round(time.time() - started, 2),
                }
                losses.clear()
                ray.train.report(row)
                if rank == 0:
                    logger.info("step %d/%d loss %.4f lr %.2e %.0f tokens/s/worker", step, total_steps, row["loss"],
                                row["lr"], row["tokens_per_s_worker"])
                    with metrics_path.open("a") as fh:
                        fh.write(json.dumps(row) + "\n")
            if step >= total_steps:
                break
        if step >= total_steps:
            break

    export(engine, loop_config, rank)
    if rank == 0:
        summary = {"steps": step, "tokens_worker0": tokens, "wall_time_s": round(time.time() - started, 2)}
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
