"""Serving cost of the target prompt, and Serve's overhead, side by side in one Ray session:

  1. the raydistill Serve app (HTTP proxy, router, one vLLM replica per model): requests/s and
     latency for ``student`` (the bare query) and ``teacher`` (the same query with the long
     target prompt of task ``langid-long`` injected server-side) at client concurrency 1/16/64;
  2. the same engine class as a plain Ray actor in the same Ray session, called through its
     actor handle with the very requests the router would send (no HTTP, no proxy, no router):
     Serve's share of the cost.

Fair by construction: every cell gets texts no other cell sent (the engine's prefix cache can
only reuse what is meant to be shared: the target prompt and the chat template). The student
is a trained one (default: the demo's, ``runs/demo/student/merged``; run ``make demo`` first),
because an untrained copy of the base weights does not stop where the teacher stops and would
measure answer length, not the prompt. Both are served with the task's forced answer prefix,
and the table shows the output tokens each produced.

While each cell runs, the CPU seconds of each kind of process are sampled (the client, Serve's
proxy and router, the model replica with its vLLM processes, the rest of Ray), which shows
where Serve's cost goes on a small machine.

    scripts/loopback-only .venv/bin/python bench/serve_bench.py       # ~15 min on 2 cores

Writes ``bench/results/serve.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from common import REPO, RESULTS, git_commit

MODEL = "builtin:smollm2-135m-instruct"
TASK = "langid-long"
MAX_TOKENS = 8
LEVELS = (1, 16, 64)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def requests_at(concurrency: int, scale: float) -> int:
    """Requests per cell: enough to fill the concurrency several times, few where it is 1."""
    return max(8, int(scale * max(24, 4 * concurrency)))


class Texts:
    """Distinct query texts handed out cell by cell, never twice."""

    def __init__(self) -> None:
        from raydistill.data.builtin import build_langid_demo

        self.texts = [r["text"] for r in build_langid_demo()["train"]]
        self.used = 0

    def take(self, n: int) -> list[str]:
        if self.used + n > len(self.texts):
            raise SystemExit(f"only {len(self.texts)} distinct texts; lower --scale")
        out = self.texts[self.used : self.used + n]
        self.used += n
        return out


def role(proc: psutil.Process) -> str | None:
    """Which part of the system a process is, by its command line (ours only: this session's Ray)."""
    try:
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return None
    for needle, name in (("ProxyActor", "serve proxy"), (":router", "serve router"), ("model-", "model replica + vLLM"),
                         ("VLLM", "model replica + vLLM"), ("ModelServer", "model replica + vLLM"),
                         ("ServeController", "ray (other)"), ("raylet", "ray (other)"), ("gcs_server", "ray (other)"),
                         ("ray::", "ray (other)"), ("dashboard", "ray (other)")):
        if needle in cmd:
            return name
    return None


def cpu_by_role() -> dict[str, float]:
    """CPU seconds (user + system) so far of this process tree's processes, by role."""
    me = psutil.Process()
    totals: dict[str, float] = {"client (this process)": sum(me.cpu_times()[:2])}
    for proc in me.children(recursive=True):
        name = role(proc)
        if name is None:
            continue
        try:
            totals[name] = totals.get(name, 0.0) + sum(proc.cpu_times()[:2])
        except psutil.Error:
            continue
    return totals


def summarize(latencies: list[float], wall: float, tokens: list[tuple[int, int]], cpu: dict[str, float]) -> dict:
    lat = np.asarray(latencies)
    return {"requests": len(lat), "rps": len(lat) / wall, "wall_s": wall, "p50_s": float(np.percentile(lat, 50)),
            "p95_s": float(np.percentile(lat, 95)), "mean_input_tokens": float(np.mean([t[0] for t in tokens])),
            "mean_output_tokens": float(np.mean([t[1] for t in tokens])),
            "cpu_s": {k: round(v, 2) for k, v in sorted(cpu.items())}}


async def timed(calls: list, concurrency: int) -> dict:
    """Run the coroutine factories ``calls`` with at most ``concurrency`` in flight; each returns
    its (prompt tokens, completion tokens)."""
    gate = asyncio.Semaphore(concurrency)

    async def one(call) -> tuple[float, tuple[int, int]]:
        async with gate:
            t = time.perf_counter()
            tokens = await call()
            return time.perf_counter() - t, tokens

    cpu0 = cpu_by_role()
    start = time.perf_counter()
    results = await asyncio.gather(*(one(c) for c in calls))
    wall = time.perf_counter() - start
    cpu1 = cpu_by_role()
    cpu = {k: v - cpu0.get(k, 0.0) for k, v in cpu1.items()}
    return summarize([r[0] for r in results], wall, [r[1] for r in results], cpu)


def body(model: str, text: str) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": MAX_TOKENS, "temperature": 0}


async def http_cell(url: str, model: str, texts: list[str], concurrency: int) -> dict:
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency),
                                     timeout=aiohttp.ClientTimeout(total=900)) as session:
        def call(text: str):
            async def go() -> tuple[int, int]:
                async with session.post(f"{url}/v1/chat/completions", json=body(model, text)) as resp:
                    resp.raise_for_status()
                    usage = (await resp.json())["usage"]
                    return usage["prompt_tokens"], usage["completion_tokens"]
            return go

        return await timed([call(t) for t in texts], concurrency)


async def direct_cell(actor, plan_for, model: str, texts: list[str], concurrency: int) -> dict:
    def call(text: str):
        async def go() -> tuple[int, int]:
            out = await actor.generate.remote(plan_for(model, text))
            return out["prompt_tokens"], sum(c["completion_tokens"] for c in out["choices"])
        return go

    return await timed([call(t) for t in texts], concurrency)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=float, default=1.0, help="requests per cell x this (default: 24/64/256)")
    parser.add_argument("--student", default=str(REPO / "runs" / "demo" / "student" / "merged"),
                        help="a trained student of task langid-long (default: the demo's)")
    args = parser.parse_args()

    import ray
    from ray import serve

    from raydistill.config import PipelineConfig
    from raydistill.engine import CPU_ENGINE_ENV
    from raydistill.models import resolve_model
    from raydistill.serve.app import ModelServer
    from raydistill.serve.openai_api import ChatCompletionRequest
    from raydistill.serve.routing import plan_request, routes_for
    from raydistill.serve.stage import shutdown_serving, start_serving
    from raydistill.tasks.pipeline_tasks import run_tasks

    base = resolve_model(MODEL)
    student = Path(args.student).resolve()
    if not (student / "config.json").is_file():
        raise SystemExit(f"no trained student at {student}; run `make demo` first or pass --student PATH")
    work = Path(tempfile.mkdtemp(prefix="rd-bench-serve-"))
    (work / "run" / "student").mkdir(parents=True)
    os.symlink(student, work / "run" / "student" / "merged")
    serve_cfg = {"dtype": "auto", "enforce_eager": True, "port": free_port(), "max_ongoing_requests": 64}
    cfg = PipelineConfig.model_validate({
        "run_dir": str(work / "run"), "task": {"name": TASK},
        "queries": {"train_path": "builtin:langid-demo/train", "eval_path": "builtin:langid-demo/eval"},
        "teacher": {"model": MODEL}, "train": {"target": "response"}, "serve": serve_cfg, "cluster": {"num_cpus": 4}})
    tasks = run_tasks(cfg)
    task = tasks[0].spec
    routes = routes_for(True, tasks, student_prefix=True)

    def plan_for(model: str, text: str):
        return plan_request(ChatCompletionRequest.model_validate(body(model, text)), routes)

    texts = Texts()
    results: dict[str, dict] = {}
    systems = ("student", "teacher")
    url = start_serving(cfg, with_base=False)
    try:
        for model in systems:  # warm-up: the first requests pay lazy initialisation and cache the prompt
            asyncio.run(http_cell(url, model, texts.take(8), 4))
        for c in LEVELS:
            for model in systems:
                key = f"serve/{model}/c{c}"
                results[key] = asyncio.run(http_cell(url, model, texts.take(requests_at(c, args.scale)), c))
                print(f"[bench] {key}: {results[key]}", flush=True)  # noqa: T201
    finally:
        shutdown_serving(cfg)  # Ray stays up: the direct actors run in the same session

    # The same engine class, resources and environment as a Serve replica, as a plain actor.
    # Any: Ray's types do not follow an actor class through ray.remote(**options)
    actor_cls: Any = ray.remote(num_cpus=1, runtime_env={"env_vars": CPU_ENGINE_ENV})(ModelServer)
    actors = {name: actor_cls.remote(path, cfg.serve.model_dump(), 1)
              for name, path in (("student", str(student)), ("teacher", base))}
    ray.get([a.health.remote() for a in actors.values()])

    async def run_direct() -> None:
        for model in systems:
            await direct_cell(actors[model], plan_for, model, texts.take(8), 4)
        for c in LEVELS:
            for model in systems:
                key = f"direct/{model}/c{c}"
                results[key] = await direct_cell(actors[model], plan_for, model, texts.take(requests_at(c, args.scale)), c)
                print(f"[bench] {key}: {results[key]}", flush=True)  # noqa: T201

    asyncio.run(run_direct())
    for a in actors.values():
        ray.kill(a)
    serve.shutdown()
    ray.shutdown()
    write(results, args, len(task.teacher_messages("x")), str(student))


def write(results: dict[str, dict], args: argparse.Namespace, teacher_turns: int, student: str) -> None:
    import vllm

    r = results
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "commit": git_commit(),
            "command": "scripts/loopback-only .venv/bin/python bench/serve_bench.py"
                       + (f" --scale {args.scale}" if args.scale != 1.0 else ""),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "vllm": vllm.__version__, "model": MODEL,
            "task": TASK, "teacher_messages": teacher_turns, "max_tokens": MAX_TOKENS, "student": student,
            "serve": "1 replica per model, dtype auto, enforce_eager, prefix caching on, distinct texts per cell"}
    lines = ["# Serving benchmark", "",
             f"`{meta['command']}` at {meta['commit']}, {meta['date']}; {meta['machine']}, vllm {meta['vllm']}, {MODEL}, "
             f"greedy, {MAX_TOKENS} new tokens at most. Teacher = the task `{TASK}`'s target prompt injected server-side; "
             f"student = `{student}` (trained on that task) given the bare query. Every cell sends "
             "texts no other cell sent. Direct = the same engine class as a Ray actor in the same Ray session, called "
             "through its handle with the requests the router would send (no HTTP, proxy or router).", "",
             "| concurrency | requests | student req/s | teacher req/s | student/teacher req/s | student p50 / p95 (s) | "
             "teacher p50 / p95 (s) | input tokens student / teacher | output tokens student / teacher | "
             "direct student / teacher req/s | "
             "Serve/direct student | Serve/direct teacher |",
             "|---:|---:|---:|---:|---:|---|---|---|---|---|---:|---:|"]
    ratios: dict[str, float] = {}
    for c in LEVELS:
        s, t = r[f"serve/student/c{c}"], r[f"serve/teacher/c{c}"]
        ds, dt = r[f"direct/student/c{c}"], r[f"direct/teacher/c{c}"]
        ratios[f"rps_student_over_teacher_c{c}"] = s["rps"] / t["rps"]
        ratios[f"serve_over_direct_c{c}"] = s["rps"] / ds["rps"]
        ratios[f"serve_over_direct_teacher_c{c}"] = t["rps"] / dt["rps"]
        lines.append(f"| {c} | {s['requests']} | {s['rps']:.2f} | {t['rps']:.2f} | {s['rps'] / t['rps']:.2f} | "
                     f"{s['p50_s']:.2f} / {s['p95_s']:.2f} | {t['p50_s']:.2f} / {t['p95_s']:.2f} | "
                     f"{s['mean_input_tokens']:.0f} / {t['mean_input_tokens']:.0f} | "
                     f"{s['mean_output_tokens']:.1f} / {t['mean_output_tokens']:.1f} | {ds['rps']:.2f} / {dt['rps']:.2f} | "
                     f"{s['rps'] / ds['rps']:.2f} | {t['rps'] / dt['rps']:.2f} |")
    lines += ["", "CPU seconds per 100 requests by process kind (student, concurrency 16): where Serve's share goes.", "",
              "| process kind | Serve | direct |", "|---|---:|---:|"]
    served, direct = r["serve/student/c16"], r["direct/student/c16"]
    for kind in sorted(set(served["cpu_s"]) | set(direct["cpu_s"])):
        per = [100 * x["cpu_s"].get(kind, 0.0) / x["requests"] for x in (served, direct)]
        lines.append(f"| {kind} | {per[0]:.1f} | {per[1]:.1f} |")
    lines += ["", "| ratio | value |", "|---|---:|"] + [f"| {k} | {v:.2f} |" for k, v in ratios.items()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serve.json").write_text(json.dumps({"meta": meta, "results": results, "ratios": ratios}, indent=2))
    (RESULTS / "serve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))  # noqa: T201


if __name__ == "__main__":
    main()
