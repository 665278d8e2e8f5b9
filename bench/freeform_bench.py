"""The free-form example end to end at its default size, on the built-in model: how close does the
student get to the prompted teacher, and to the untrained base?

    scripts/loopback-only .venv/bin/python bench/freeform_bench.py [--seeds 0 1]

Runs ``raydistill run examples/custom_task/support/config.yaml`` once per training seed (the
teacher is greedy, so the samples are the same; the student's initialisation and data order are
the draw) into ``runs/bench-freeform-seed<s>``, and writes ``bench/results/freeform.{json,md}``:
per draw the fidelity summary of the evaluation (``evaluate/fidelity.py``), and ``ratios`` (the mean
over draws, with each draw's value alongside):
  - ``input_tokens_teacher_over_student``: the prompt tokens the student no longer needs;
  - ``teacher_logprob_gap``: the teacher's log-prob per token of its own answer minus of the
    student's, under the teacher with its prompt (nats; 0 = as likely);
  - ``fidelity_student_over_base``: the per-token probability the prompted teacher gives the
    student's answers over the untrained base model's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

from common import REPO, git_commit, host, write_results  # bench/common.py (the script's folder is on sys.path)

CONFIG = "examples/custom_task/support/config.yaml"
RATIOS = ("input_tokens_teacher_over_student", "teacher_logprob_gap", "fidelity_student_over_base")


def one_draw(seed: int) -> dict[str, Any]:
    run_dir = f"runs/bench-freeform-seed{seed}"
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "raydistill", "run", CONFIG, f"run_dir={run_dir}",
                           f"train.seed={seed}", "--overwrite"], cwd=REPO, text=True, capture_output=True)
    if proc.returncode != 0:
        raise SystemExit(f"raydistill run failed (seed {seed}):\n{proc.stderr[-3000:]}")
    manifest = json.loads((REPO / run_dir / "eval" / "_manifest.json").read_text())
    metrics = manifest["metrics"]
    systems = metrics["systems"]
    return {
        "seed": seed, "run_dir": run_dir, "wall_s": round(time.time() - started, 1),
        "payoff": metrics["payoff"], "fidelity": metrics["fidelity"],
        "mean_input_tokens": {s: v["mean_input_tokens"] for s, v in systems.items()},
        "throughput_rps": {s: v["throughput_rps"] for s, v in systems.items()},
    }


def summarize(draws: list[dict[str, Any]]) -> dict[str, Any]:
    ratios: dict[str, Any] = {}
    for key in RATIOS:
        values = [d["payoff"][key] for d in draws]
        ratios[key] = round(sum(values) / len(values), 4)
        ratios[f"{key}_per_draw"] = [round(v, 4) for v in values]
    return ratios


def markdown(out: dict[str, Any]) -> str:
    h = out["host"]
    lines = ["# Free-form distillation: the support example (examples/custom_task/support)", "",
             f"`{out['provenance']['command']}` at {out['provenance']['commit']}, {out['provenance']['date']}; "
             f"host: {h['cpu']}, {h['cores']} cores, flags {' '.join(h['flags']) or 'none of avx2/avx512'}.", "",
             "The teacher (SmolLM2-135M-Instruct with the ~330-token support policy as system prompt) answers 227 "
             "training messages greedily; a LoRA student learns its replies without the prompt; 42 held-out "
             "messages go to teacher, base (the same model, no prompt, untrained) and student; the teacher with "
             "its prompt then scores every answer (mean log-prob per token).", "",
             "| draw (train.seed) | log-prob gap student [95%] | gap base | student as likely or more | chrF student / base "
             "| per-token p student / base / teacher | input tokens teacher/student | wall |",
             "|---|---|---|---|---|---|---|---|"]
    for d in out["draws"]:
        f, s, b = d["fidelity"], d["fidelity"]["student"], d["fidelity"]["base"]
        p = {k: v["per_token_prob"] for k, v in f["systems"].items()}
        ci = s["teacher_logprob_gap_ci95"]
        lines.append(f"| {d['seed']} | {s['teacher_logprob_gap']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | "
                     f"{b['teacher_logprob_gap']:.3f} | {100 * s['at_least_teacher']:.1f}% | {s['chrf']:.1f} / {b['chrf']:.1f} | "
                     f"{p['student']:.3f} / {p['base']:.3f} / {p['teacher']:.3f} | "
                     f"{d['payoff']['input_tokens_teacher_over_student']:.1f}x | {d['wall_s']:.0f} s |")
    r = out["ratios"]
    lines += ["", "ratios (mean over draws): " + ", ".join(f"`{k}` {r[k]}" for k in RATIOS), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    draws = [one_draw(s) for s in args.seeds]
    out = {"draws": draws, "ratios": summarize(draws), "host": host(),
           "provenance": {"command": "scripts/loopback-only .venv/bin/python bench/freeform_bench.py "
                                     + " ".join(["--seeds", *map(str, args.seeds)]),
                          "commit": git_commit(), "config": CONFIG, "date": time.strftime("%Y-%m-%d")}}
    write_results("freeform", out, markdown(out))


if __name__ == "__main__":
    main()
