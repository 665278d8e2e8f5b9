"""On-policy distillation after off-policy, at the off-policy demo's teacher-token budget: does it help?

    scripts/loopback-only .venv/bin/python bench/on_policy_bench.py [--sft-files 13] [--seeds 0]

Two arms on the demo task (jobs/configs/demo_cpu.yaml: langid-long, a ~1,440-token target prompt):
  - ``off_policy``: the demo as it is: 300 teacher samples, one epoch of LoRA steps on them;
  - ``on_policy``: the first ``--sft-files`` files of the same samples (16 each), the same recipe on
    them, then ``train.on_policy`` steps until the teacher has read as many tokens as for the 300
    samples (each on-policy answer costs its scoring prefill: prompt + answer).
Both students go through the same evaluation: ``raydistill run`` serves teacher and student and
sends the 200 held-out queries (agreement with the teacher, accuracy, Wilson intervals). Then one
measurement of the per-token reverse KL(student || prompted teacher) on held-out queries, the same
for every student and the untrained base: the product's rollout engine (fp32, so its log-probs are
the student's) samples 2 answers to each of ``--kl-queries`` held-out queries with fixed seeds, and
the product's teacher scorer reads them. Wall time per on-policy step by phase comes from the
on-policy run's manifest. Writes ``bench/results/on_policy.{json,md}`` with
``ratios.agreement_on_policy_over_off_policy`` and ``ratios.reverse_kl_on_policy_over_off_policy``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from common import REPO, git_commit, host, write_results  # bench/common.py (the script's folder is on sys.path)

CONFIG = "jobs/configs/demo_cpu.yaml"
ANSWERS_PER_STEP = 8  # 2 workers x 4 queries x 1 sample (the bench's on-policy settings below)
ON_POLICY = {"queries_per_step": 4, "samples_per_query": 1, "max_tokens": 12, "eval_queries": 16,
             "rollout_kv_cache_gib": 0.5}


def raydistill(*args: str) -> None:
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "raydistill", *args], cwd=REPO, text=True, capture_output=True)
    if proc.returncode != 0:
        raise SystemExit(f"raydistill {' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    print(f"raydistill {' '.join(args[:2])}: {time.time() - started:.0f}s", flush=True)  # noqa: T201


def teacher_tokens(samples: Path) -> int:
    """The input tokens the teacher read for a samples folder (its prompt and each query)."""
    return sum(sum(pq.read_table(f, columns=["num_input_tokens"]).column(0).to_pylist())
               for f in sorted(samples.glob("*.parquet")))


def eval_metrics(run_dir: Path) -> dict[str, Any]:
    """Agreement with the teacher and accuracy (each with its Wilson interval) of a finished run."""
    metrics = json.loads((run_dir / "eval" / "_manifest.json").read_text())["metrics"]
    pay, systems = metrics["payoff"], metrics["systems"]

    def acc(system: str) -> dict[str, Any] | None:
        s = systems[system]
        return {"value": s["accuracy"], "ci95": s["accuracy_ci95"]} if s.get("accuracy") is not None else None

    return {"agreement": {"value": pay["agreement"], "ci95": pay["agreement_ci95"]}, "accuracy": acc("student"),
            "teacher_accuracy": acc("teacher")}


def copy_samples(src: Path, dst: Path, files: int) -> None:
    """The first ``files`` sample files of a finished generate run, as a finished samples folder."""
    dst.mkdir(parents=True)
    for f in sorted(src.glob("*.parquet"))[:files]:
        shutil.copy(f, dst / f.name)
    shutil.copy(src / "_manifest.json", dst / "_manifest.json")


def held_out_reverse_kl(students: dict[str, Path | None], n_queries: int) -> dict[str, dict[str, Any]]:
    """Per-token reverse KL(student || prompted teacher) of each student (a LoRA adapter folder, or
    None for the base) on the first ``n_queries`` held-out queries, 2 seeded samples each, measured
    by the product's engines; with a bootstrap-free 95% interval over queries."""
    import numpy as np
    import ray
    from transformers import AutoTokenizer

    from raydistill.config import load_config
    from raydistill.data.builtin import build_langid_demo
    from raydistill.models import resolve_model
    from raydistill.student.on_policy import query_prompts, serves_prefix, teacher_view
    from raydistill.student.on_policy_engines import ADAPTER_FILES, RolloutEngine, TeacherScorer, rollout_kwargs
    from raydistill.tasks.task import task_for
    from raydistill.teacher.generate import engine_kwargs

    cfg = load_config(REPO / CONFIG, [])
    task = task_for(cfg.task)
    model = resolve_model(cfg.train.student_model)
    tok = AutoTokenizer.from_pretrained(model)
    prompts: list[Any] = []  # the first held-out queries whose prompt and answer fit the rollout engine (as training's do)
    for row in build_langid_demo()["eval"]:
        p = query_prompts(tok, tok, task, row["text"], serves_prefix(task, cfg))
        if len(p.student) + 12 <= cfg.train.max_seq_len and len(prompts) < n_queries:
            prompts.append(p)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        env = {"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}}
        rollout: Any = ray.remote(RolloutEngine).options(num_cpus=1, runtime_env=env).remote(
            model, rollout_kwargs(cfg.train, cfg.serve, cfg.train.max_seq_len), cfg.train.lora_rank)
        teacher = engine_kwargs(cfg.teacher)
        teacher.update(enable_chunked_prefill=False, max_num_batched_tokens=cfg.teacher.max_model_len)
        scorer: Any = ray.remote(TeacherScorer).options(num_cpus=1, runtime_env=env).remote(resolve_model(cfg.teacher.model),
                                                                                       teacher)
        out = {}
        for version, (name, adapter) in enumerate(students.items()):
            if adapter is not None:
                ray.get(rollout.load_adapter.remote(version, {f: (adapter / f).read_bytes() for f in ADAPTER_FILES}))
            samples = ray.get(rollout.generate.remote([p.student for p in prompts], [1000 + i for i in range(len(prompts))],
                                                      2, 12, 1.0))
            pairs = [(i, p, s) for i, (p, per) in enumerate(zip(prompts, samples)) for s in per if s["token_ids"]]
            views = [teacher_view(p, s["token_ids"]) for _, p, s in pairs]
            scores = ray.get(scorer.score.remote([v[0] for v in views], [v[1] for v in views],
                                                 [s["token_ids"][: v[2]] for (_, _, s), v in zip(pairs, views)]))
            per_query: dict[int, list[float]] = {}
            for (i, _, s), t in zip(pairs, scores):
                per_query.setdefault(i, []).extend(np.array(s["logprobs"]) - np.array(t["logprobs"]))
            means = np.array([np.mean(v) for v in per_query.values()])
            tokens = np.concatenate([np.array(v) for v in per_query.values()])
            half = 1.96 * means.std(ddof=1) / np.sqrt(len(means))
            out[name] = {"per_token": round(float(tokens.mean()), 4), "per_query_mean": round(float(means.mean()), 4),
                         "ci95": [round(float(means.mean() - half), 4), round(float(means.mean() + half), 4)],
                         "queries": len(means), "tokens": int(len(tokens))}
            print(f"held-out reverse KL {name}: {out[name]}", flush=True)  # noqa: T201
        return out
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sft-files", type=int, default=13, help="sample files (16 samples each) the on-policy arm's "
                        "off-policy steps use; the rest of the budget goes to on-policy scoring")
    parser.add_argument("--kl-queries", type=int, default=64)
    parser.add_argument("--skip-runs", action="store_true", help="reuse finished runs under runs/bench-on-policy-*")
    parser.add_argument("--reuse-off-policy", action="store_true", help="reuse a finished off-policy arm")
    args = parser.parse_args()
    started = time.time()
    off, on = REPO / "runs" / "bench-on-policy-off", REPO / "runs" / "bench-on-policy-on"
    timings: dict[str, float] = {}
    reuse_off = args.reuse_off_policy and (off / "eval" / "_manifest.json").is_file()
    if not (args.skip_runs or reuse_off):
        t = time.time()
        raydistill("run", CONFIG, f"run_dir={off}", "--overwrite")
        timings["off_policy_run_s"] = round(time.time() - t, 1)
    budget = teacher_tokens(off / "samples")
    n_samples = pq.ParquetDataset(str(off / "samples")).read(columns=["id"]).num_rows
    per_answer = budget / n_samples + ON_POLICY["max_tokens"]  # a scored answer: the teacher's prompt and the answer
    if not args.skip_runs:
        shutil.rmtree(on, ignore_errors=True)
        copy_samples(off / "samples", on / "samples", args.sft_files)
    sft_tokens = teacher_tokens(on / "samples")
    steps = max(1, int((budget - sft_tokens) / (ANSWERS_PER_STEP * per_answer)))
    if not args.skip_runs:
        t = time.time()
        overrides = [f"train.on_policy.{k}={v}" for k, v in {**ON_POLICY, "steps": steps}.items()]
        raydistill("run", CONFIG, f"run_dir={on}", *overrides, "--resume")  # generate: complete, skipped
        timings["on_policy_run_s"] = round(time.time() - t, 1)
    counts = json.loads((on / "student" / "_manifest.json").read_text())["counts"]
    kl = held_out_reverse_kl({"base": None, "off_policy": off / "student" / "adapter",
                              "on_policy": on / "student" / "adapter"}, args.kl_queries)
    arms = {"off_policy": {**eval_metrics(off), "teacher_input_tokens": budget, "samples": n_samples,
                           "off_policy_steps": json.loads((off / "student" / "_manifest.json").read_text())["counts"]["steps"]},
            "on_policy": {**eval_metrics(on), "teacher_input_tokens": sft_tokens + counts["on_policy"]["teacher_tokens"],
                          "samples": counts["valid_samples"], "off_policy_steps": counts["off_policy_steps"],
                          "on_policy_steps": counts["on_policy"]["steps"], "on_policy": counts["on_policy"]}}
    for name in arms:
        arms[name]["held_out_reverse_kl"] = kl[name]
    ratios = {
        "agreement_on_policy_over_off_policy": round(arms["on_policy"]["agreement"]["value"]
                                                     / arms["off_policy"]["agreement"]["value"], 4),
        "reverse_kl_on_policy_over_off_policy": round(kl["on_policy"]["per_token"] / kl["off_policy"]["per_token"], 4),
        "teacher_tokens_on_policy_over_off_policy": round(arms["on_policy"]["teacher_input_tokens"] / budget, 4),
    }
    out = {"host": host(), "commit": git_commit(), "config": CONFIG, "on_policy_settings": {**ON_POLICY, "steps": steps},
           "arms": arms, "base_reverse_kl": kl["base"], "ratios": ratios, "timings": timings,
           "wall_s": round(time.time() - started, 1),
           "command": "scripts/loopback-only .venv/bin/python bench/on_policy_bench.py " + " ".join(sys.argv[1:])}
    write_results("on_policy", out, markdown(out))


def fmt(metric: dict[str, Any] | None) -> str:
    if not metric:
        return "-"
    lo, hi = metric["ci95"]
    return f"{100 * metric['value']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def markdown(out: dict[str, Any]) -> str:
    h, arms = out["host"], out["arms"]
    lines = [
        "# On-policy after off-policy, at the off-policy demo's teacher-token budget", "",
        f"`{out['command']}` at {out['commit']} on {h['cpu']} ({h['cores']} cores; {', '.join(h['flags'])}); "
        f"{out['wall_s'] / 60:.0f} min. Task and recipe: `{out['config']}`; one draw (seed 0).", "",
        "| arm | teacher input tokens | samples | off-policy steps | on-policy steps | agreement | accuracy | "
        "held-out reverse KL / token [95%] |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, a in arms.items():
        kl = a["held_out_reverse_kl"]
        lines.append(f"| {name} | {a['teacher_input_tokens']:,} | {a['samples']} | {a['off_policy_steps']} | "
                     f"{a.get('on_policy_steps', 0)} | {fmt(a['agreement'])} | {fmt(a['accuracy'])} | "
                     f"{kl['per_query_mean']:.3f} [{kl['ci95'][0]:.3f}, {kl['ci95'][1]:.3f}] |")
    base = out["base_reverse_kl"]
    op = arms["on_policy"]["on_policy"]
    sec = op["seconds_per_step"]
    lines += [
        "", f"Untrained base: {base['per_query_mean']:.3f} [{base['ci95'][0]:.3f}, {base['ci95'][1]:.3f}] nats/token "
        f"({base['queries']} held-out queries, {base['tokens']} tokens). Teacher accuracy: "
        f"{fmt(arms['off_policy']['teacher_accuracy'])}.",
        f"On-policy run's own held-out reverse KL ({out['on_policy_settings']['eval_queries']} queries, measured "
        f"during training): {op['start_eval_reverse_kl']:.3f} before its on-policy steps, "
        f"{op['final_eval_reverse_kl']:.3f} after.",
        f"Seconds per on-policy step: rollout {sec['rollout_s']}, scoring {sec['score_s']}, update {sec['update_s']}, "
        f"adapter sync {sec['sync_s']}.", "",
        "Ratios: " + ", ".join(f"`{k}` {v}" for k, v in out["ratios"].items()), "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
