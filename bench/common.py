"""What the product benchmarks share: where their results go, what every result records with its
numbers (the host: CPU flags decide the engines' speed; the commit), and plain vLLM's engine
arguments, built by ``raydistill.engine`` exactly as the stages build their own.

The bench scripts run as ``python bench/<script>.py``: the script's own folder is then on
``sys.path`` (``from common import ...``) and raydistill is the installed package (``pip install
-e .``). The langid studies in ``research/langid/`` cannot see this folder without a ``sys.path``
edit, so they do not import it: their engines come from ``research/langid/study.py``, which calls
``raydistill.engine.engine_args`` as well.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def host() -> dict[str, Any]:
    """The machine, for every time quoted: cores and the CPU flags that decide the engines' speed."""
    flags: set[str] = set()
    model = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    return {"cpu": model, "cores": os.cpu_count(), "flags": [f for f in wanted if f in flags]}


def git_commit() -> str:
    """The checkout's short commit ("unknown" outside a git checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_results(name: str, out: dict[str, Any], markdown: str, indent: int = 1) -> None:
    """``bench/results/<name>.{json,md}``; the markdown is printed too."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=indent) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown)
    print(markdown)  # noqa: T201


def teacher_engine_kwargs(teacher: dict[str, Any]) -> dict[str, Any]:
    """The vLLM engine arguments, model included, that ``raydistill generate`` gives its engine for
    the teacher settings ``teacher`` (a ``TeacherConfig``'s fields): plain vLLM run side by side
    with the stage gets the same engine."""
    from raydistill.config import TeacherConfig
    from raydistill.models import resolve_model
    from raydistill.teacher.generate import engine_kwargs

    cfg = TeacherConfig(**teacher)
    return {"model": resolve_model(cfg.model), **engine_kwargs(cfg)}
