"""Teacher sampling throughput, side by side in one run on one machine, on the demo's task:

  (a) ``raydistill generate`` (Ray Data + the ray.data.llm vLLM actor, parse, Parquet);
  (b) plain vLLM with the same engine arguments, three ways: ``LLM.generate`` in-process
      (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), ``LLM.generate`` with the engine core in its own
      process (vLLM's default), and ``AsyncLLM`` with every request submitted at once (what
      ray.data.llm runs inside its actor);
  (c) a plain batched transformers ``generate`` loop (on a subset: it is slow);

each with the target prompt ("prompted": ``langid-long``, ~1,350 tokens, prefix-cached) and
with bare queries ("bare": what the student sees), on the same model (SmolLM2-135M-Instruct),
the same rendered prompts, greedy, 8 new tokens.

    scripts/loopback-only .venv/bin/python bench/generate_bench.py [--queries 256]

Writes ``bench/results/generate.{json,md}``. Two rates per row:
* end-to-end: process start to the last sample (Ray, engine start-up and model load included);
* generation: engine ready to the last output, the rate a long run converges to. For (a) engine
  ready is the engine's ``init engine`` log line and the end the last Parquet file's mtime; for
  (b) the ``generate`` call (all requests at once); for (c) all batches after the first.
``ratios.raydistill_over_best_plain_vllm`` is (a) over the fastest of (b), generation rate,
prompted.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from common import REPO, RESULTS, teacher_engine_kwargs

MODEL = "builtin:smollm2-135m-instruct"
PROMPTED_TASK = "langid-long"  # the demo's task
MARKER = "BENCH-RESULT "  # engines print to stdout too; the result line is the one with this prefix
TEACHER: dict[str, Any] = {"model": MODEL, "dtype": "float32", "enforce_eager": True, "temperature": 0.0, "max_tokens": 8,
           "batch_size": 64, "rows_per_file": 256}


def make_queries(n: int, path: Path) -> None:
    """n sentences from eld's multilingual test set, picked by hash (deterministic, all languages)."""
    from raydistill.data.builtin import _eld_sentences

    texts = sorted({t for sentences in _eld_sentences().values() for t in sentences},
                   key=lambda t: hashlib.sha256(t.encode()).hexdigest())[:n]
    with path.open("w", encoding="utf-8") as fh:
        for t in texts:
            fh.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")


def bare_task(path: Path) -> None:
    """The langid task without its target prompt: the bare query, as the student sees it
    (no system message, so the chat template's default one, as the demo's student)."""
    spec = yaml.safe_load((REPO / "raydistill" / "tasks" / "langid" / "task.yaml").read_text())
    spec.pop("system_prompt_file", None)
    spec.update(name="langid-bare", user_template="{query}", assistant_prefix="")
    path.write_text(yaml.safe_dump(spec))


def prompts(task_name: str, queries: Path, limit: int | None = None) -> list[str]:
    from transformers import AutoTokenizer

    from raydistill.models import resolve_model
    from raydistill.render import render_prompt
    from raydistill.tasks.task import load_task

    task = load_task(task_name)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(MODEL))
    rows = [json.loads(line)["text"] for line in queries.read_text(encoding="utf-8").splitlines()][:limit]
    return [render_prompt(tokenizer, task.teacher_messages(q), task.assistant_prefix) for q in rows]


# ---- (b) and (c): run in their own process, print one JSON line -------------------------------

PLAIN_VLLM = ("vllm-inproc", "vllm-mp", "vllm-async")


def plain_vllm(kind: str, task_name: str, queries: Path) -> dict:
    """One of PLAIN_VLLM, with raydistill's engine arguments; the environment is set before vLLM loads."""
    t0 = time.time()
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if kind == "vllm-inproc" else "1"
    import vllm
    from vllm import SamplingParams

    texts = prompts(task_name, queries)
    kwargs = teacher_engine_kwargs(TEACHER)  # the engine raydistill generate builds for TEACHER
    params = SamplingParams(temperature=0.0, max_tokens=TEACHER["max_tokens"])
    if kind == "vllm-async":
        engine = vllm.AsyncLLMEngine.from_engine_args(vllm.AsyncEngineArgs(**kwargs))

        async def one(i: int, text: str):
            final = None
            async for out in engine.generate(text, params, request_id=str(i)):
                final = out
            return final

        async def run_all():
            return await asyncio.gather(*(one(i, t) for i, t in enumerate(texts)))

        t1 = time.time()
        outputs = asyncio.run(run_all())
        t2 = time.time()
        engine.shutdown()
    else:
        llm = vllm.LLM(**kwargs)
        t1 = time.time()
        outputs = llm.generate(texts, params, use_tqdm=False)
        t2 = time.time()
    return {"queries": len(outputs), "end_to_end_s": t2 - t0, "steady_s": t2 - t1,
            "output_tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
            "input_tokens": sum(len(o.prompt_token_ids) for o in outputs)}


def plain_hf(task_name: str, queries: Path, limit: int, batch_size: int = 16) -> dict:
    t0 = time.time()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raydistill.models import resolve_model

    torch.set_num_threads(os.cpu_count() or 1)
    path = resolve_model(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    texts = prompts(task_name, queries, limit)
    times = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            t = time.time()
            enc = tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            model.generate(**enc, max_new_tokens=TEACHER["max_tokens"], do_sample=False, pad_token_id=tokenizer.pad_token_id)
            times.append((time.time() - t, len(texts[i : i + batch_size])))
    end = time.time()
    steady_n = sum(n for _, n in times[1:])
    return {"queries": len(texts), "end_to_end_s": end - t0, "steady_s": sum(t for t, _ in times[1:]),
            "steady_queries": steady_n}


# ---- (a): the real CLI -----------------------------------------------------------------------

ENGINE_READY = re.compile(r"INFO (\d\d-\d\d \d\d:\d\d:\d\d) \[core\.py:\d+\] init engine")


def run_raydistill(task_name: str, queries: Path, work: Path, n: int) -> dict:
    run_dir = work / f"run-{Path(task_name).stem}"
    config = {"run_dir": str(run_dir), "task": {"name": task_name},
              "queries": {"train_path": str(queries), "eval_path": str(queries)},
              "teacher": {**TEACHER, "max_rows": n}, "cluster": {"num_cpus": 4}}
    cfg = work / f"config-{Path(task_name).stem}.yaml"
    cfg.write_text(yaml.safe_dump(config))
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "raydistill", "generate", str(cfg), "--overwrite", "-v"],
                          cwd=REPO, capture_output=True, text=True)
    end_to_end = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    samples = run_dir / "samples"
    last_file = max(f.stat().st_mtime for f in samples.glob("*.parquet"))
    stamps = ENGINE_READY.findall(proc.stdout + proc.stderr)
    if not stamps:
        raise RuntimeError("no 'init engine' line in the generate log: cannot time the engine's share")
    ready = time.mktime(time.strptime(f"{time.localtime(t0).tm_year}-{stamps[-1]}", "%Y-%m-%d %H:%M:%S"))
    counts = json.loads((samples / "_manifest.json").read_text())["counts"]
    return {"queries": counts["rows"], "end_to_end_s": end_to_end, "steady_s": last_file - ready,
            "input_tokens": counts["input_tokens"], "output_tokens": counts["output_tokens"],
            "parse_rate": counts["parse_rate"]}


def worker(kind: str, task_name: str, queries: Path, limit: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--task", task_name, "--queries-file", str(queries),
           "--hf-queries", str(limit)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARKER)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{kind} worker failed (rc {proc.returncode}): {proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(MARKER):])


def rates(r: dict) -> dict:
    steady_q = r.get("steady_queries", r["queries"])
    return {**r, "qps_end_to_end": r["queries"] / r["end_to_end_s"], "qps_steady": steady_q / r["steady_s"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queries", type=int, default=256)
    parser.add_argument("--hf-queries", type=int, default=48, help="transformers is slow: time it on a subset")
    parser.add_argument("--worker", choices=[*PLAIN_VLLM, "hf"])
    parser.add_argument("--task")
    parser.add_argument("--queries-file")
    args = parser.parse_args()
    if args.worker in PLAIN_VLLM:
        print(MARKER + json.dumps(plain_vllm(args.worker, args.task, Path(args.queries_file))), flush=True)  # noqa: T201
        return
    if args.worker == "hf":
        print(MARKER + json.dumps(plain_hf(args.task, Path(args.queries_file), args.hf_queries)), flush=True)  # noqa: T201
        return

    work = Path(tempfile.mkdtemp(prefix="rd-bench-gen-"))
    queries = work / "queries.jsonl"
    make_queries(args.queries, queries)
    bare = work / "langid-bare.yaml"
    bare_task(bare)
    results: dict[str, dict] = {}
    systems: dict[str, Callable[[str], dict]] = {
               "raydistill": lambda t: run_raydistill(t, queries, work, args.queries),
               **{kind: functools.partial(worker, kind, queries=queries, limit=args.hf_queries) for kind in PLAIN_VLLM},
               "transformers": lambda t: worker("hf", t, queries, args.hf_queries)}
    for variant, task_name in (("prompted", PROMPTED_TASK), ("bare", str(bare))):
        for system, fn in systems.items():
            print(f"[bench] {system} / {variant} ...", file=sys.stderr, flush=True)  # noqa: T201
            results[f"{system}/{variant}"] = rates(fn(task_name))
            print(f"[bench] {system} / {variant}: {json.dumps(results[f'{system}/{variant}'])}", file=sys.stderr, flush=True)  # noqa: T201
            (work / "partial-results.json").write_text(json.dumps(results, indent=2))  # survives a crash of a later part
    write(results, args)


def write(results: dict[str, dict], args: argparse.Namespace) -> None:
    import torch
    import vllm

    r = results

    def gen(key: str) -> float:
        return r[key]["qps_steady"]

    ratios: dict[str, float | str] = {}
    for variant in ("prompted", "bare"):
        best = max(PLAIN_VLLM, key=lambda k: gen(f"{k}/{variant}"))
        suffix = "" if variant == "prompted" else "_bare"
        ratios[f"raydistill_over_best_plain_vllm{suffix}"] = gen(f"raydistill/{variant}") / gen(f"{best}/{variant}")
        ratios[f"best_plain_vllm{suffix}"] = best
        ratios[f"raydistill_over_transformers{suffix}"] = gen(f"raydistill/{variant}") / gen(f"transformers/{variant}")
        ratios[f"raydistill_over_best_plain_vllm_end_to_end{suffix}"] = (
            r[f"raydistill/{variant}"]["qps_end_to_end"] / max(r[f"{k}/{variant}"]["qps_end_to_end"] for k in PLAIN_VLLM))
    ratios["raydistill_prompted_over_bare_time_per_query"] = gen("raydistill/bare") / gen("raydistill/prompted")
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "vllm": vllm.__version__, "torch": torch.__version__, "model": MODEL, "teacher": TEACHER,
            "queries": args.queries, "hf_queries": args.hf_queries, "prompted_task": PROMPTED_TASK,
            "command": "python bench/generate_bench.py " + " ".join(sys.argv[1:])}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "generate.json").write_text(json.dumps({"meta": meta, "results": results, "ratios": ratios}, indent=2))
    lines = ["# Teacher sampling benchmark", "", f"{meta['date']}, {meta['machine']}, vllm {meta['vllm']}, "
             f"torch {meta['torch']}, {MODEL}, fp32, greedy, {TEACHER['max_tokens']} new tokens; prompted = task "
             f"`{PROMPTED_TASK}`. `{meta['command']}`", "",
             "| system | prompt | queries | end-to-end q/s | generation q/s | input tok/query |",
             "|---|---|---:|---:|---:|---:|"]
    for key, v in results.items():
        system, variant = key.split("/")
        tok = f"{v['input_tokens'] / v['queries']:.0f}" if "input_tokens" in v else "—"
        lines.append(f"| {system} | {variant} | {v['queries']} | {v['qps_end_to_end']:.2f} | {v['qps_steady']:.2f} | {tok} |")
    lines += ["", "| ratio | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.2f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in ratios.items()]
    (RESULTS / "generate.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))  # noqa: T201


if __name__ == "__main__":
    main()
