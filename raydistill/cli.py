"""The `raydistill` command: one verb per stage, plus `run` (all stages) and `demo`."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import posixpath
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from raydistill.errors import RaydistillError
from raydistill.storage import MANIFEST, Location, location

if TYPE_CHECKING:
    from raydistill.config import PipelineConfig

EXIT_USAGE = 2

VERBS = {
    "generate": "Teacher sampling: queries -> vLLM (ray.data.llm) with the target prompt -> <run_dir>/samples.",
    "train": "Student fine-tuning: samples -> Ray Train + DeepSpeed ZeRO + PEFT -> <run_dir>/student.",
    "serve": "Serve student and teacher behind one OpenAI-compatible Ray Serve app (until Ctrl-C).",
    "evaluate": "Send held-out queries as traffic to the app; write <run_dir>/eval with metrics and report.",
    "run": "All stages from one config: generate -> train -> serve -> evaluate.",
    "demo": "`run` on the built-in CPU demo config (offline model and data, ~15 minutes on 2 cores).",
    "plan": "What a config asks of Ray per stage, the work and an estimated time; checks a connected "
            "cluster (RAY_ADDRESS) has the resources. Starts no engine.",
    "config": "`config show CONFIG [overrides]`: the resolved config, every key with its description.",
}

OVERRIDES_HELP = "dotted overrides of config keys, e.g. teacher.temperature=0.7 train.max_steps=5"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raydistill",
        description="Prompt (context) distillation on Ray: a teacher answers with a long prompt, "
        "a student learns to answer the same without it.",
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, text in VERBS.items():
        p = sub.add_parser(verb, help=text, description=text)
        if verb == "config":
            p.add_argument("action", choices=["show"], help="show: print the resolved config")
        if verb != "demo":
            p.add_argument("config", help="pipeline YAML (e.g. jobs/configs/demo_cpu.yaml)")
        p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
        p.add_argument("-v", "--verbose", action="store_true",
                       help="stream Ray's, vLLM's and DeepSpeed's own logs here (default: progress lines only)")
        if verb in ("generate", "train", "evaluate", "run", "demo"):
            p.add_argument("--overwrite", action="store_true", help="replace this stage's existing output")
        if verb in ("generate", "train", "run", "demo"):
            p.add_argument("--resume", action="store_true",
                           help="finish an interrupted run: skip complete stages, sample only what is missing")
        if verb == "evaluate":
            p.add_argument("--url", help="base URL of a running `raydistill serve` app; default: start one")
        if verb == "plan":
            p.add_argument("--queries", type=int, metavar="N",
                           help="plan as if the train queries were N rows (sizing: e.g. --queries 10000000)")
        if verb not in ("plan", "config"):
            p.add_argument("--dry-run", action="store_true", help="print the plan (`raydistill plan`) and stop")
    return parser


def _load(args: argparse.Namespace) -> PipelineConfig:
    from raydistill.config import load_config

    if args.verb == "demo":
        from raydistill.pipeline import DEMO_CONFIG

        return load_config(DEMO_CONFIG, args.overrides)
    return load_config(args.config, args.overrides)


def _dispatch(args: argparse.Namespace, cfg: PipelineConfig) -> None:
    if args.verb == "config":
        from raydistill.config import render_config

        print(render_config(cfg))  # noqa: T201
    elif args.verb == "plan" or args.dry_run:
        from raydistill.plan import run_plan

        run_plan(cfg, queries=getattr(args, "queries", None))
    elif args.verb == "generate":
        from raydistill.teacher.generate import generate

        generate(cfg, overwrite=args.overwrite, resume=args.resume)
    elif args.verb == "train":
        from raydistill.student.train import train

        train(cfg, overwrite=args.overwrite, resume=args.resume)
    elif args.verb == "serve":
        from raydistill.serve.stage import serve_forever

        serve_forever(cfg)
    elif args.verb == "evaluate":
        from raydistill.evaluate.evaluate import evaluate
        from raydistill.serve.stage import shutdown_serving, start_serving

        if args.url:
            evaluate(cfg, args.url, overwrite=args.overwrite)
        else:
            url = start_serving(cfg, with_base="base" in cfg.eval.systems)
            try:
                evaluate(cfg, url, overwrite=args.overwrite)
            finally:
                shutdown_serving(cfg)
    else:
        from raydistill.pipeline import run_pipeline

        run_pipeline(cfg, overwrite=args.overwrite, resume=args.resume)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        from raydistill.progress import VERBOSE_ENV

        os.environ[VERBOSE_ENV] = "1"
    logging.basicConfig(level=os.environ.get("RAYDISTILL_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    run_dir: Location | None = None
    existed = True  # until known otherwise: never clean up a run_dir we could not look at
    try:
        cfg = _load(args)
        run_dir = location(cfg.run_dir)
        existed = run_dir.exists()
        _dispatch(args, cfg)
    except RaydistillError as exc:
        _remove_if_empty(run_dir, existed)
        print(f"raydistill: error: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("raydistill: interrupted", file=sys.stderr)  # noqa: T201
        return 130
    return 0


def _remove_if_empty(run_dir: Location | None, existed: bool) -> None:
    """A run refused for bad input leaves nothing behind: drop a run_dir we created that holds
    no artifact. (Other failures keep it: it may hold a partial output for --resume.)"""
    if run_dir is None or existed:
        return
    with contextlib.suppress(RaydistillError):  # storage that cannot be reached holds nothing of ours
        files = run_dir.list(recursive=True, hidden=True)
        if not any(posixpath.basename(f.path) == MANIFEST for f in files):
            run_dir.delete()


if __name__ == "__main__":
    sys.exit(main())
