"""Student training speed and memory, side by side in one run on one machine:

  * ``raydistill train`` with 2 Ray Train workers (1 core each) under DDP (ZeRO-0), ZeRO-2 and
    ZeRO-3, PEFT LoRA (r16 on q/k/v/o) — the shipped setup;
  * a plain single-process transformers + PEFT loop on both cores (HF forward with labels,
    padding to the longest row, torch AdamW): the same model, data, effective batch and steps;
  * memory: full fine-tuning under DDP vs ZeRO-3 (LoRA's trainable state is too small for
    ZeRO's sharding to show), peak RSS of worker 0 while training (before the export), its
    growth above the RSS before the model was built (the ~0.44 GB of Ray/torch/DeepSpeed
    imports that no ZeRO stage can shard), and the steady RSS after the last step. Pairs run
    with the defaults, and with gradient checkpointing plus a fixed glibc mmap threshold (so
    freed activations go back to the OS and RSS shows live memory) at 2 and 4 workers, and on
    a random-weight model of SmolLM2-360M's shape (362M parameters: memory does not depend on
    the weights, and there is no hub here to fetch the real ones).

Model: SmolLM2-135M-Instruct (fp32). ~50 min on 2 cores. Data: the built-in langid train queries with their gold
answers as hand-made valid samples (the train stage reads only the samples contract).

    scripts/loopback-only .venv/bin/python bench/train_bench.py

Writes ``bench/results/train.{json,md}``. ``--parts full-z3-gc-m,...`` re-runs single rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from common import REPO, RESULTS

MODEL = "builtin:smollm2-135m-instruct"
WORKERS, BATCH = 2, 8
PLAIN = "plain transformers+PEFT (1 process, 2 threads)"
PARTS = ["plain", "lora-z0", "lora-z2", "lora-z3", "full-z0", "full-z3", "full-z0-gc-m", "full-z3-gc-m", "full-z0-gc-m-w4",
         "full-z3-gc-m-w4", "full-z0-gc-m-360m", "full-z3-gc-m-360m"]
# SmolLM2-360M's shape (no hub here to fetch its weights): memory does not depend on the values.
SHAPE_360M = {"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 15,
              "num_key_value_heads": 5}
SHAPE_NOTE = "SmolLM2-360M shape, random init"
# glibc raises its mmap threshold after large frees and then keeps freed tensor memory in its
# heaps; a fixed 1 MiB threshold returns it to the OS, so RSS shows what is actually live.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}
MALLOC_NOTE = "MALLOC_MMAP_THRESHOLD_=1MiB"


def write_samples(folder: Path) -> int:
    from raydistill.data.builtin import build_langid_demo
    from raydistill.schema import SAMPLES
    from raydistill.tasks.task import load_task

    task = load_task("langid")
    rows = build_langid_demo()["train"]
    n = len(rows)
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({
        "id": [r["id"] for r in rows], "task": [task.name] * n, "query": [r["text"] for r in rows], "gold": [r["gold"] for r in rows],
        "sample_index": [0] * n, "prompt_sha256": [task.prompt_sha256] * n, "teacher_model": ["gold"] * n,
        "response": [f" {task.labels[r['gold']]}." for r in rows], "label": [r["gold"] for r in rows],
        "valid": [True] * n, "reject_reason": [None] * n, "num_input_tokens": [0] * n, "num_output_tokens": [0] * n,
        **{c: [None] * n for c in ("token_ids", "token_logprobs", "top_token_ids", "top_logprobs")},
    }, schema=SAMPLES), folder / "part-0.parquet")
    return n


def random_model(folder: Path, shape: dict[str, int]) -> str:
    """SmolLM2-135M's config, tokenizer and chat template with another size, random weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from raydistill.models import resolve_model

    if not (folder / "config.json").is_file():
        source = resolve_model(MODEL)
        config = AutoConfig.from_pretrained(source)
        for key, value in shape.items():
            setattr(config, key, value)
        config.head_dim = shape["hidden_size"] // shape["num_attention_heads"]
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
        AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return str(folder)


def run_raydistill(work: Path, name: str, steps: int, env: dict[str, str] | None = None, model: str = MODEL,
                   **train) -> dict:
    run = work / name
    write_samples(run / "samples")
    config = {"run_dir": str(run), "queries": {"train_path": "builtin:langid-demo/train", "eval_path": "builtin:langid-demo/eval"},
              "train": {"student_model": model, "num_workers": WORKERS, "batch_size_per_worker": BATCH, "max_steps": steps,
                        "log_every": 1, "val_fraction": 0.0, "learning_rate": 1e-4, **train},
              "cluster": {"num_cpus": 4}}
    cfg = work / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(config))
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "raydistill", "train", str(cfg)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    counts = json.loads((run / "student" / "_manifest.json").read_text())["counts"]
    rows = [json.loads(line) for line in (run / "student" / "metrics.jsonl").read_text().splitlines()]
    # steady state: tokens/s after the first step (which includes warm-up allocations)
    return {"end_to_end_s": time.time() - t0, "steps": counts["steps"],
            "tokens_per_s": train.get("num_workers", WORKERS) * rows[-1]["tokens_per_s_worker"], "train_wall_s": counts["train_wall_s"],
            # training peaks: read before the export, which gathers and reloads whole models on rank 0
            "peak_rss_mb_worker": counts["peak_rss_training_mb_worker0"],
            "peak_rss_above_start_mb_worker": counts["peak_rss_training_above_start_mb_worker0"],
            "peak_rss_with_export_mb_worker": counts["peak_rss_mb_worker0"],
            # RSS after the last step: what stays resident between steps (the peak adds step transients)
            "steady_rss_mb_worker": rows[-1].get("rss_mb"), "rss_by_step_mb_worker": [r.get("rss_mb") for r in rows],
            "memory_phases_mb_worker": counts.get("memory_phases_mb_worker0")}


def plain_loop(steps: int) -> dict:
    """The plain library loop, in this process: transformers + PEFT + torch AdamW on all cores."""
    import psutil
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raydistill.data.builtin import build_langid_demo
    from raydistill.models import resolve_model
    from raydistill.render import render_completion, render_prompt
    from raydistill.tasks.task import load_task

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    rss0 = psutil.Process().memory_info().rss / 2**20
    path = resolve_model(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                           LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                      task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    task = load_task("langid")
    rows = build_langid_demo()["train"]
    batch_size = WORKERS * BATCH
    texts = []
    for r in rows[: steps * batch_size]:
        msgs = task.student_messages(r["text"])
        prompt = render_prompt(tokenizer, msgs)
        texts.append((prompt, render_completion(tokenizer, msgs, task.labels[r["gold"]])))
    tokens, t_first = 0, None
    started = time.time()
    for step in range(steps):
        chunk = texts[step * batch_size : (step + 1) * batch_size]
        ids = [tokenizer(p + a, add_special_tokens=False)["input_ids"] for p, a in chunk]
        n_prompt = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p, _ in chunk]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), tokenizer.pad_token_id)
        labels = torch.full((len(ids), width), -100)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, (x, k) in enumerate(zip(ids, n_prompt)):
            input_ids[i, : len(x)] = torch.tensor(x)
            labels[i, k : len(x)] = torch.tensor(x[k:])
            mask[i, : len(x)] = 1
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 0:
            t_first = time.time()
        else:
            tokens += int(mask.sum())
    wall = time.time() - started
    if t_first is None:
        raise ValueError("no steps run: --steps must be at least 1")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"steps": steps, "tokens_per_s": tokens / (time.time() - t_first), "train_wall_s": wall,
            "peak_rss_mb_worker": peak, "peak_rss_above_start_mb_worker": peak - rss0}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--parts", default=",".join(PARTS), help="a subset re-runs those rows into the committed results")
    parser.add_argument("--worker", choices=["plain"])
    args = parser.parse_args()
    if args.worker == "plain":
        print(json.dumps(plain_loop(args.steps)))  # noqa: T201
        return
    work = Path(tempfile.mkdtemp(prefix="rd-bench-train-"))
    parts = args.parts.split(",")
    results: dict[str, dict] = {}
    rerun_of: dict[str, str] = {}
    if parts != PARTS:  # a partial re-run: keep the other rows of the committed results, and say so
        previous = json.loads((RESULTS / "train.json").read_text())
        results = previous["results"]
        rerun_of = previous["meta"].get("rows_measured_at") or {k: previous["meta"]["date"] for k in results}
    for part in parts:
        if part == "plain":
            proc = subprocess.run([sys.executable, __file__, "--worker", "plain", "--steps", str(args.steps)], cwd=REPO,
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr[-3000:])
            key, value = PLAIN, json.loads(proc.stdout.strip().splitlines()[-1])
        else:  # e.g. lora-z2; full-z3-gc (gradient checkpointing), -m (glibc mmap threshold), -w4 (4 workers),
            # -360m (a random model of SmolLM2-360M's shape)
            method, stage, *flags = part.split("-")
            workers = next((int(f[1:]) for f in flags if f.startswith("w")), WORKERS)
            key = (f"raydistill {'LoRA' if method == 'lora' else 'full FT'} ZeRO-{stage[1:]}"
                   + (", grad ckpt" if "gc" in flags else "") + (f", {MALLOC_NOTE}" if "m" in flags else "")
                   + (f", {workers} workers" if workers != WORKERS else "") + (f", {SHAPE_NOTE}" if "360m" in flags else ""))
            extra: dict[str, Any] = {} if method == "lora" else {"method": "full", "learning_rate": 1e-5}
            if "360m" in flags:
                extra["model"] = random_model(work / "model-360m", SHAPE_360M)
            if "gc" in flags:
                extra["gradient_checkpointing"] = True
            if workers != WORKERS:  # same cores, shared: memory rows only
                extra.update(num_workers=workers, cpus_per_worker=2 / workers)
            value = run_raydistill(work, part, args.steps if method == "lora" else args.memory_steps,
                                   env=MALLOC_ENV if "m" in flags else None, zero_stage=int(stage[1:]), **extra)
        results[key] = value
        rerun_of[key] = time.strftime("%Y-%m-%d %H:%M")
        print(f"[bench] {key}: {value}", file=sys.stderr, flush=True)  # noqa: T201
        (work / "partial-results.json").write_text(json.dumps(results, indent=2))  # survives a crash of a later part
    write({k: results[k] for k in [PLAIN, *[k for k in results if k != PLAIN]]}, args, rerun_of)


def write(results: dict[str, dict], args: argparse.Namespace, measured_at: dict[str, str]) -> None:
    import deepspeed
    import torch

    plain = results[PLAIN]
    cores = 2
    ratios = {f"{k}: tokens/s per core vs plain": (v["tokens_per_s"] / cores) / (plain["tokens_per_s"] / cores)
              for k, v in results.items() if k.startswith("raydistill LoRA")}
    for key3 in [k for k in results if k.startswith("raydistill full FT ZeRO-3")]:
        full0, full3 = results.get(key3.replace("ZeRO-3", "ZeRO-0")), results[key3]
        if full0 is None:
            continue
        setup = key3.removeprefix("raydistill full FT ZeRO-3").lstrip(", ") or "defaults"
        ratios[f"full FT peak RSS per worker, ZeRO-3 / DDP ({setup})"] = full3["peak_rss_mb_worker"] / full0["peak_rss_mb_worker"]
        ratios[f"full FT peak RSS above start per worker, ZeRO-3 / DDP ({setup})"] = (
            full3["peak_rss_above_start_mb_worker"] / full0["peak_rss_above_start_mb_worker"])
        if full3.get("steady_rss_mb_worker") and full0.get("steady_rss_mb_worker"):
            ratios[f"full FT steady RSS per worker, ZeRO-3 / DDP ({setup})"] = (
                full3["steady_rss_mb_worker"] / full0["steady_rss_mb_worker"])
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "torch": torch.__version__, "deepspeed": deepspeed.__version__, "model": MODEL, "workers": WORKERS,
            "batch_per_worker": BATCH, "steps": args.steps, "memory_steps": args.memory_steps,
            "rows_measured_at": measured_at}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train.json").write_text(json.dumps({"meta": meta, "results": results, "ratios": ratios}, indent=2))
    lines = ["# Training benchmark", "", f"{meta['date']}, {meta['machine']}, torch {meta['torch']}, deepspeed "
             f"{meta['deepspeed']}, {MODEL}, fp32, {WORKERS} workers x batch {BATCH} (plain loop: batch "
             f"{WORKERS * BATCH} in one process), {args.steps} steps (full FT: {args.memory_steps}).", "",
             "| run | tokens/s | tokens/s per core | peak RSS per worker (MB) | peak RSS above start (MB) "
             "| steady RSS per worker (MB) | measured |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for k, v in results.items():
        steady = f"{v['steady_rss_mb_worker']:.0f}" if v.get("steady_rss_mb_worker") else "—"
        lines.append(f"| {k} | {v['tokens_per_s']:.0f} | {v['tokens_per_s'] / cores:.0f} | {v['peak_rss_mb_worker']:.0f} | "
                     f"{v['peak_rss_above_start_mb_worker']:.0f} | {steady} | {measured_at.get(k, meta['date'])} |")
    lines += ["", "| ratio | value |", "|---|---:|"] + [f"| {k} | {v:.2f} |" for k, v in ratios.items()]
    (RESULTS / "train.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))  # noqa: T201


if __name__ == "__main__":
    main()
