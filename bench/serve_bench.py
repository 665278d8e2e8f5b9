"""Serving cost of the target prompt, and Serve's overhead, side by side in one run:

  1. the raydistill Serve app (HTTP, router, one vLLM replica per model): requests/s and latency
     for `student` (bare query) vs `teacher` (the same query with the target prompt injected
     server-side) at several client concurrencies;
  2. the same engine class called directly in-process (``ModelServer.generate``, no HTTP, no
     Serve), with the student's requests at the same concurrencies: Serve's overhead.

The student here has the base model's weights (a symlink), so the student/teacher difference
is the prompt's tokens alone, not a difference in weights.

    scripts/loopback-only .venv/bin/python bench/serve_bench.py

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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
MODEL = "builtin:smollm2-135m-instruct"
MAX_TOKENS = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def queries(n: int) -> list[str]:
    from raydistill.data.builtin import build_langid_demo

    texts = [r["text"] for r in build_langid_demo()["eval"]]
    return [texts[i % len(texts)] for i in range(n)]


def summarize(latencies: list[float], wall: float, input_tokens: list[int]) -> dict:
    lat = np.asarray(latencies)
    return {"requests": len(lat), "rps": len(lat) / wall, "p50_s": float(np.percentile(lat, 50)),
            "p95_s": float(np.percentile(lat, 95)), "mean_input_tokens": float(np.mean(input_tokens))}


def http_load(url: str, model: str, texts: list[str], concurrency: int) -> dict:
    import requests

    session = requests.Session()
    session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=concurrency))

    def one(text: str) -> tuple[float, int]:
        t = time.perf_counter()
        resp = session.post(f"{url}/v1/chat/completions", timeout=600, json={
            "model": model, "messages": [{"role": "user", "content": text}], "max_tokens": MAX_TOKENS, "temperature": 0})
        resp.raise_for_status()
        return time.perf_counter() - t, resp.json()["usage"]["prompt_tokens"]

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, texts))
    return summarize([r[0] for r in results], time.perf_counter() - start, [r[1] for r in results])


async def direct_load(server, texts: list[str], concurrency: int) -> dict:
    gate = asyncio.Semaphore(concurrency)
    params = {"max_tokens": MAX_TOKENS, "temperature": 0.0}

    async def one(text: str) -> tuple[float, int]:
        async with gate:
            t = time.perf_counter()
            out = await server.generate([{"role": "user", "content": text}], "", params)
            return time.perf_counter() - t, out["prompt_tokens"]

    start = time.perf_counter()
    results = await asyncio.gather(*(one(t) for t in texts))
    return summarize([r[0] for r in results], time.perf_counter() - start, [r[1] for r in results])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--requests", type=int, default=128, help="requests per (system, concurrency)")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    from raydistill.config import PipelineConfig
    from raydistill.models import resolve_model
    from raydistill.serve.stage import shutdown_serving, start_serving

    base = resolve_model(MODEL)
    work = Path(tempfile.mkdtemp(prefix="rd-bench-serve-"))
    (work / "run" / "student").mkdir(parents=True)
    os.symlink(base, work / "run" / "student" / "merged")
    serve_cfg = {"dtype": "float32", "enforce_eager": True, "port": free_port(), "max_ongoing_requests": 64}
    cfg = PipelineConfig.model_validate({
        "run_dir": str(work / "run"), "queries": {"train_path": "builtin:langid-demo/train", "eval_path": "builtin:langid-demo/eval"},
        "teacher": {"model": MODEL}, "serve": serve_cfg, "cluster": {"num_cpus": 4}})
    texts = queries(args.requests)
    results: dict[str, dict] = {}
    url = start_serving(cfg)
    try:
        http_load(url, "student", texts[:8], 4)  # warm-up: first requests pay lazy initialisation
        http_load(url, "teacher", texts[:8], 4)
        for c in levels:
            for model in ("student", "teacher"):
                results[f"serve/{model}/c{c}"] = http_load(url, model, texts, c)
                print(f"[bench] serve {model} c={c}: {results[f'serve/{model}/c{c}']}", flush=True)  # noqa: T201
    finally:
        shutdown_serving()
        import ray

        ray.shutdown()

    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    from raydistill.serve.app import ModelServer

    async def run_direct() -> None:
        server = ModelServer(base, cfg.serve.model_dump())
        await direct_load(server, texts[:8], 4)
        for c in levels:
            results[f"direct/student/c{c}"] = await direct_load(server, texts, c)
            print(f"[bench] direct student c={c}: {results[f'direct/student/c{c}']}", flush=True)  # noqa: T201
        server.engine.shutdown()

    asyncio.run(run_direct())
    write(results, levels, args)


def write(results: dict[str, dict], levels: list[int], args: argparse.Namespace) -> None:
    import vllm

    r = results
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "vllm": vllm.__version__, "model": MODEL, "max_tokens": MAX_TOKENS, "requests": args.requests,
            "serve": "1 replica per model, fp32, enforce_eager, prefix caching on"}
    lines = ["# Serving benchmark", "", f"{meta['date']}, {meta['machine']}, vllm {meta['vllm']}, {MODEL}, fp32, greedy, "
             f"{MAX_TOKENS} new tokens, {args.requests} requests per cell. Student = base weights (the difference is the prompt).", "",
             "| concurrency | student req/s | teacher req/s | teacher/student time per request | student p50 / p95 (s) | "
             "teacher p50 / p95 (s) | input tokens student / teacher | direct req/s | Serve/direct req/s |",
             "|---:|---:|---:|---:|---|---|---|---:|---:|"]
    ratios = {}
    for c in levels:
        s, t, d = r[f"serve/student/c{c}"], r[f"serve/teacher/c{c}"], r[f"direct/student/c{c}"]
        ratios[f"c{c}"] = {"teacher_over_student_time": s["rps"] / t["rps"], "serve_over_direct_rps": s["rps"] / d["rps"]}
        lines.append(f"| {c} | {s['rps']:.2f} | {t['rps']:.2f} | {s['rps'] / t['rps']:.2f} | {s['p50_s']:.3f} / {s['p95_s']:.3f} | "
                     f"{t['p50_s']:.3f} / {t['p95_s']:.3f} | {s['mean_input_tokens']:.0f} / {t['mean_input_tokens']:.0f} | "
                     f"{d['rps']:.2f} | {s['rps'] / d['rps']:.2f} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serve.json").write_text(json.dumps({"meta": meta, "results": results, "ratios": ratios}, indent=2))
    (RESULTS / "serve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))  # noqa: T201


if __name__ == "__main__":
    main()
