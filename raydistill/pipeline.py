"""`raydistill run`: every stage from one config; `raydistill demo`: the same on the CPU demo config.

    ray job submit --working-dir . -- python -m raydistill run jobs/configs/demo_cpu.yaml
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from raydistill.config import PipelineConfig
from raydistill.evaluate.evaluate import evaluate
from raydistill.serve.stage import shutdown_serving, start_serving
from raydistill.storage import Location, location
from raydistill.student.train import train
from raydistill.teacher.generate import generate

logger = logging.getLogger(__name__)

# Inside the package, so an installed wheel has it (in a checkout, a link to jobs/configs/demo_cpu.yaml).
DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo_cpu.yaml"


def _done(folder: Location) -> bool:
    return folder.complete()


def run_pipeline(cfg: PipelineConfig, *, overwrite: bool = False, resume: bool = False) -> dict[str, Any]:
    """generate → train → serve → evaluate. With ``resume``, finished stages are skipped."""
    run_dir = location(cfg.run_dir)
    times: dict[str, float] = {}

    def stage(name: str, folder: Location, fn) -> None:
        if resume and _done(folder):
            logger.info("%s: already done (%s), skipping", name, folder)
            return
        logger.info("=== stage %s ===", name)
        t = time.time()
        fn()
        times[name] = time.time() - t
        logger.info("=== %s done in %.1f s ===", name, times[name])

    stage("generate", run_dir / "samples", lambda: generate(cfg, overwrite=overwrite, resume=resume))
    stage("train", run_dir / "student", lambda: train(cfg, overwrite=overwrite, resume=resume))
    t = time.time()
    url = start_serving(cfg, with_base="base" in cfg.eval.systems)
    times["serve (start)"] = time.time() - t
    try:
        t = time.time()
        summary = evaluate(cfg, url, overwrite=True, stage_times=times)
        times["evaluate"] = time.time() - t
    finally:
        shutdown_serving(cfg)
    print("\nwall time per stage: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))  # noqa: T201
    print(f"run directory: {run_dir}  (report: {run_dir / 'eval' / 'report.md'})")  # noqa: T201
    return {"metrics": summary, "stage_times": times}
