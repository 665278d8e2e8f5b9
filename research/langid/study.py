"""What the langid studies share: where their results go, and greedy answers from plain vLLM on
the engine raydistill's own stages build (``raydistill.engine.engine_args``: the same dtype
resolution and CPU KV-cache setting), with the studies' fixed settings (eager, block 32, prefix
caching, seed 0, a 1 GiB KV cache).

The studies run as ``python research/langid/<script>.py``: their own folder is then on
``sys.path`` (``from study import ...``) and raydistill is the installed package. (bench/ has its
own ``bench/common.py`` for the product benchmarks; neither folder imports the other.)

``engine`` builds an engine in the calling process (the demonstration selection scores many
prompts on one); ``answer`` runs this file in a child process, so each student's engine starts
clean:

    python research/langid/study.py MODEL DTYPE PROMPTS.json OUT.json MAX_TOKENS
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "research" / "langid" / "results"


def repo_relative(path: Path) -> str:
    """``path`` as recorded in a result: relative to the repository when it lies inside it."""
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def engine_kwargs(dtype: str, max_model_len: int) -> dict[str, Any]:
    """The studies' vLLM engine arguments on a CPU (``dtype``: a vLLM dtype, or ``auto``)."""
    from raydistill.engine import engine_args

    return engine_args(dtype=dtype, accelerator="cpu", max_model_len=max_model_len, enforce_eager=True,
                       block_size=32, kv_cache_gib=1.0, seed=0)


def engine(model: str, dtype: str, max_model_len: int = 4096) -> Any:
    """A vLLM engine in this process (set ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` first to keep its core here)."""
    from vllm import LLM

    return LLM(model=model, **engine_kwargs(dtype, max_model_len))


def answer(model: str, dtype: str, prompts: list[str], work: Path, max_tokens: int = 8) -> list[str]:
    """Greedy answers to rendered prompts, from a clean engine in a child process (``work`` keeps
    ``prompts.json`` and ``answers.json``)."""
    work.mkdir(parents=True, exist_ok=True)
    prompts_file, out_file = work / "prompts.json", work / "answers.json"
    prompts_file.write_text(json.dumps(prompts))
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, __file__, model, dtype, str(prompts_file), str(out_file), str(max_tokens)],
                          capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"greedy answers from {model} failed: {proc.stderr[-2000:]}")
    return json.loads(out_file.read_text())


def child(model: str, dtype: str, prompts_file: str, out_file: str, max_tokens: str) -> None:
    from raydistill.engine import CPU_ENGINE_ENV

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    for key, value in CPU_ENGINE_ENV.items():
        os.environ.setdefault(key, value)
    from vllm import SamplingParams

    prompts = json.loads(Path(prompts_file).read_text())
    outs = engine(model, dtype, max_model_len=2048).generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=int(max_tokens)), use_tqdm=False)
    Path(out_file).write_text(json.dumps([o.outputs[0].text for o in outs]))


if __name__ == "__main__":
    child(*sys.argv[1:6])
