"""Does a GPU engine fit its GPUs? Weights plus one full-length sequence of KV cache, from the
model's own ``config.json`` (read from local disk only), against the GPU's memory share vLLM
is given. Used by ``raydistill plan``; pure except for reading the config.

The parameter count comes from building the model on PyTorch's meta device (no memory, no
weights), so mixtures of experts and tied embeddings are counted as the model defines them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Memory per GPU by Ray accelerator type (GB, as vendors quote it).
GPU_MEMORY_GB = {"H200": 141.0, "H100": 80.0, "A100": 80.0, "A100-40G": 40.0, "L40S": 48.0, "L4": 24.0, "A10G": 24.0,
                 "T4": 16.0}
ASSUMED_GPU = "H100"  # when the config names no accelerator type
BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "auto": 2}


@dataclass(frozen=True)
class Fit:
    """One engine on its GPUs: weights and a full-length sequence's KV cache vs the memory it gets."""

    engine: str
    params_b: float
    weights_gb: float
    kv_gb_per_sequence: float
    budget_gb: float
    gpu: str

    @property
    def fits(self) -> bool:
        return self.weights_gb + self.kv_gb_per_sequence <= self.budget_gb

    @property
    def sequences(self) -> int:
        """Full-length sequences the KV cache left over can hold at once."""
        return max(0, int((self.budget_gb - self.weights_gb) / self.kv_gb_per_sequence)) if self.kv_gb_per_sequence else 0

    def line(self) -> str:
        """One line of ``raydistill plan``'s output."""
        verdict = (f"fits: {self.sequences:,} full-length sequences of KV cache" if self.fits
                   else "DOES NOT FIT: raise tensor_parallel_size, lower max_model_len, or use bigger GPUs")
        return (f"{self.engine}: {self.params_b:.1f}B parameters, {self.weights_gb:.1f} GB weights + "
                f"{self.kv_gb_per_sequence:.2f} GB KV per sequence per GPU, of {self.budget_gb:.1f} GB ({self.gpu}) - {verdict}")


def count_params(config: Any) -> int:
    """Parameters of the model ``config`` describes, without allocating them."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def kv_bytes_per_token(config: Any, dtype_bytes: int) -> int:
    """Keys and values of every layer for one token."""
    text = getattr(config, "text_config", None) or config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * dtype_bytes


def engine_fit(engine: str, config: Any, *, params: int, dtype: str, tensor_parallel: int, max_model_len: int,
               memory_utilization: float, accelerator_type: str | None) -> Fit:
    """vLLM gives an engine ``memory_utilization`` of each of its GPUs' total memory (engines
    sharing a GPU each get their own fraction of the whole), split evenly by tensor parallelism."""
    gpu = accelerator_type if accelerator_type in GPU_MEMORY_GB else ASSUMED_GPU
    width = BYTES.get(dtype, 2)
    per_gpu = GPU_MEMORY_GB[gpu] * memory_utilization
    return Fit(engine=engine, params_b=params / 1e9, weights_gb=params * width / tensor_parallel / 1e9,
               kv_gb_per_sequence=kv_bytes_per_token(config, width) * max_model_len / tensor_parallel / 1e9,
               budget_gb=per_gpu, gpu=gpu if accelerator_type else f"{gpu} assumed")
