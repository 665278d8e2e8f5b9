"""The student and its DeepSpeed engine: the DeepSpeed config, the model (PEFT, ZeRO-3
partitioned loading, MoE leaf blocks), the client optimizer and schedule, and a fix for a
DeepSpeed 0.19 memory bug. Needs an initialised torch.distributed group, nothing from Ray."""

from __future__ import annotations

import logging
import re
from typing import Any

from raydistill.config import TrainConfig

logger = logging.getLogger(__name__)

MOE_BLOCK = re.compile(r"(Sparse)?Mo[Ee](Block|Layer)$")  # Qwen2/3-MoE, Mixtral, OLMoE, ... blocks


def deepspeed_config(train: TrainConfig, hidden_size: int | None = None) -> dict[str, Any]:
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
    zero: dict[str, Any] = {"stage": train.zero_stage}
    if hidden_size and train.zero_stage == 3:
        h2 = hidden_size * hidden_size
        zero.update(reduce_bucket_size=h2, stage3_prefetch_bucket_size=int(0.9 * h2),
                    stage3_param_persistence_threshold=10 * hidden_size,
                    stage3_max_live_parameters=10 * h2, stage3_max_reuse_distance=10 * h2)
    return {
        "train_micro_batch_size_per_gpu": train.batch_size_per_worker,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "bf16": {"enabled": train.dtype == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def skip_shm_comm_build() -> None:
    """DeepSpeed would JIT-compile its shm comm op (~2 min) at init; gloo/NCCL is all we need."""
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def lr_schedule(optimizer: Any, total_steps: int, warmup_ratio: float) -> Any:
    """Linear warmup, then cosine decay to 10% of the peak rate (transformers' schedule)."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=int(warmup_ratio * total_steps), num_training_steps=total_steps, min_lr_rate=0.1)


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


def build_model(model_path: str, train: TrainConfig) -> Any:
    """The student, loaded in the training dtype and in training mode. Under ZeRO-3 the weights
    are partitioned as they load (``deepspeed.zero.Init`` through transformers' DeepSpeed
    integration), so no rank ever holds the whole model: without it every worker would first
    materialise all of it."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    dtype = torch.bfloat16 if train.dtype == "bf16" else torch.float32
    # transformers keeps only a weak reference: the object must stay alive while loading.
    zero3 = HfDeepSpeedConfig(deepspeed_config(train)) if train.zero_stage == 3 else None
    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        if zero3 is not None:
            mark_moe_leaves(model)
        # from_pretrained returns the model in eval mode, and neither PEFT nor DeepSpeed changes
        # that for the layers: gradient checkpointing and LoRA dropout act only in train mode.
        model.train()
        model.config.use_cache = False
        if train.gradient_checkpointing:
            # Non-reentrant: works with frozen inputs (LoRA) and with ZeRO-3's parameter hooks.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model if train.method == "full" else with_lora(model, train)
    finally:
        if zero3 is not None:
            # Later loads (the rank-0 merge at export) must be plain, not collective.
            unset_hf_deepspeed_config()


def with_lora(model: Any, train: TrainConfig) -> Any:
    from peft import LoraConfig, get_peft_model

    targets = train.lora_target_modules
    lora = LoraConfig(
        r=train.lora_rank,
        lora_alpha=train.lora_alpha,
        lora_dropout=train.lora_dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def build_engine(model_path: str, train: TrainConfig, total_steps: int) -> tuple[Any, Any]:
    """Student + client AdamW + warmup/cosine schedule, wrapped by DeepSpeed."""
    import deepspeed
    import torch

    model = build_model(model_path, train)
    params = [p for p in model.parameters() if p.requires_grad]
    # Fused: the unfused update allocates sqrt/div temporaries the size of each parameter, and
    # under ZeRO-3 the "parameter" is a rank's whole flat partition (one transient copy per term).
    optimizer = torch.optim.AdamW(params, lr=train.learning_rate, weight_decay=train.weight_decay, fused=True)
    scheduler = lr_schedule(optimizer, total_steps, train.warmup_ratio)
    hidden = getattr(model.config, "hidden_size", None)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(train, hidden))
    if train.zero_stage == 3 and (freed := share_zero3_master_weights(engine.optimizer)):
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
