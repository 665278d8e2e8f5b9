"""`raydistill serve`: start the OpenAI-compatible app for the run's student and its teacher.

    ray job submit --working-dir . -- python -m raydistill serve jobs/configs/demo_cpu.yaml
"""

from __future__ import annotations

import logging
import time
from typing import Any

from raydistill.config import PipelineConfig
from raydistill.errors import DataError
from raydistill.identity import check_prompts, manifest_prompts
from raydistill.models import check_models_on_nodes, resolve_model
from raydistill.runtime import connect, started_local_ray
from raydistill.serve.app import build_app, start
from raydistill.storage import MANIFEST, Location, location
from raydistill.tasks.pipeline_tasks import run_tasks

logger = logging.getLogger(__name__)


def student_path(cfg: PipelineConfig) -> Location:
    return location(cfg.run_dir) / "student" / "merged"


def trained_target(cfg: PipelineConfig) -> str:
    """What the run's student was trained to say (its manifest), else what the config asks for."""
    manifest = location(cfg.run_dir) / "student" / MANIFEST
    try:
        return str(manifest.read_json()["config"]["train"]["target"])
    except (OSError, ValueError, KeyError, TypeError):
        return cfg.train.target


def application(cfg: PipelineConfig, *, require_student: bool = True, with_base: bool = True) -> Any:
    """The Serve application for a run: teacher (+ student when trained, + the student's starting
    model as ``base`` when it is not the teacher's and ``with_base``). Builds, starts nothing."""
    tasks = run_tasks(cfg)
    paths = {"teacher": resolve_model(cfg.teacher.model)}
    base = resolve_model(cfg.train.student_model)
    base_engine: str | None = "teacher"  # the teacher's engine also answers as `base`
    if base != paths["teacher"]:
        base_engine = "base" if with_base else None
        if with_base:
            paths["base"] = base
    merged = student_path(cfg)
    # a committed student only: replicas load it from run storage (a URI: each downloads a copy)
    if merged.parent.complete() and (merged / "config.json").is_file():
        check_prompts(manifest_prompts(merged.parent) or {}, tasks, f"the student in {merged.parent.uri!r}",
                      allow=cfg.allow_prompt_change)
        paths["student"] = merged.uri
    elif require_student:
        raise DataError(f"no trained student at {merged.uri!r}; run `raydistill train` first")
    prefix = cfg.serve.student_answer_prefix and "student" in paths and trained_target(cfg) == "response"
    return build_app(paths, tasks, cfg.serve, student_prefix=prefix, base_engine=base_engine)


def start_serving(cfg: PipelineConfig, *, require_student: bool = True, with_base: bool = True) -> str:
    """Deploy the run's application (see ``application``) and return the base URL once healthy."""
    app = application(cfg, require_student=require_student, with_base=with_base)
    connect(cfg)
    check_models_on_nodes({name: resolve_model(name) for name in (cfg.teacher.model, cfg.train.student_model)})
    started = time.time()
    url = start(app, cfg.serve)
    logger.info("serve: ready in %.1f s", time.time() - started)
    return url


def shutdown_serving(cfg: PipelineConfig) -> None:
    """Remove what ``start_serving`` deployed. On a cluster this process did not start, only its
    own application goes: Serve and the other applications on it keep running."""
    from ray import serve

    if started_local_ray():
        serve.shutdown()
    else:
        serve.delete(cfg.serve.app_name)


def serve_forever(cfg: PipelineConfig) -> None:
    url = start_serving(cfg, require_student=False)
    logger.info("serving at %s/v1 — press Ctrl-C to stop", url)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        shutdown_serving(cfg)
