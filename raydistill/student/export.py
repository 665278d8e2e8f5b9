"""The trained student out of the DeepSpeed engine: the LoRA adapter and the merged HF model
(or, for full fine-tuning, the consolidated weights), written by rank 0."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from raydistill.config import TrainConfig


def export(engine: Any, train: TrainConfig, model_path: str, export_dir: Path, rank: int) -> None:
    """Write ``adapter/`` (LoRA) and ``merged/`` from rank 0; every rank joins any ZeRO-3 gather."""
    import deepspeed
    import torch

    model = engine.module
    if train.method == "full":
        state = engine._zero3_consolidated_16bit_state_dict() if train.zero_stage == 3 else model.state_dict()
        if rank == 0:
            model.save_pretrained(export_dir / "merged", state_dict=state, safe_serialization=True)
        return
    trainable = [p for p in model.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None, enabled=train.zero_stage == 3):
        if rank == 0:
            from peft import get_peft_model_state_dict

            state = {k: v.detach().to(torch.float32).cpu() for k, v in get_peft_model_state_dict(model).items()}
            model.save_pretrained(export_dir / "adapter", state_dict=state)
    if rank == 0:
        merge_adapter(model_path, export_dir / "adapter", export_dir / "merged")


def merge_adapter(base_path: str, adapter_dir: Path, merged_dir: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(merged_dir, safe_serialization=True)
    os.sync()
