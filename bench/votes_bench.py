"""Self-consistent teacher labels: does training on the majority of k teacher votes help?

    scripts/loopback-only .venv/bin/python bench/votes_bench.py [--ks 1 3 5] [--temperature 0.7]

On the demo task (jobs/configs/demo_cpu.yaml: langid-long, the same 300 training queries and 200
held-out queries), for each k: ``raydistill run`` with ``teacher.votes=k`` at the same sampling
temperature (k = 1 is one sampled vote), so the student learns the majority label of k votes.
Then on the held-out queries, each student is compared with
  - the single-vote teacher: the served teacher's (greedy) answer, as the demo reports it;
  - the majority teacher: the majority of 5 sampled votes of the teacher on the same queries
    (``raydistill generate`` on the eval split with ``teacher.votes=5``);
  - the gold labels (accuracy),
with 95% Wilson intervals, and the teacher tokens each k spent (input, output). Writes
``bench/results/votes.{json,md}`` with ``ratios.agreement_majority_k5_over_k1``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import REPO, git_commit, host, write_results  # bench/common.py (the script's folder is on sys.path)

CONFIG = "jobs/configs/demo_cpu.yaml"
EVAL_VOTES = 5


def run(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "raydistill", *args], cwd=REPO, text=True, capture_output=True)
    if proc.returncode != 0:
        raise SystemExit(f"raydistill {' '.join(args)} failed:\n{proc.stderr[-3000:]}")


def majority_labels(run_dir: Path) -> dict[str, str | None]:
    """The majority label of each query's samples (``student/votes.majority_vote``)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from raydistill.student.votes import majority_vote

    table = pq.read_table(run_dir / "samples", columns=["id", "sample_index", "label", "valid"])
    out = {}
    for qid in pc.unique(table["id"]).to_pylist():
        row = majority_vote(table.filter(pc.equal(table["id"], qid)))
        out[qid] = row["label"][0].as_py() if row["valid"][0].as_py() else None
    return out


def share(hits: int, n: int) -> dict[str, Any]:
    from raydistill.evaluate.metrics import wilson_interval

    return {"value": round(hits / n, 4) if n else None, "ci95": [round(x, 4) for x in wilson_interval(hits, n)], "n": n}


def one_k(k: int, temperature: float, majority: dict[str, str | None]) -> dict[str, Any]:
    import pyarrow.parquet as pq

    run_dir = REPO / "runs" / f"bench-votes-k{k}"
    started = time.time()
    run("run", CONFIG, f"run_dir={run_dir}", f"teacher.votes={k}", f"teacher.temperature={temperature}", "--overwrite")
    rows = pq.read_table(run_dir / "eval" / "results").to_pylist()
    teacher = {r["id"]: r for r in rows if r["system"] == "teacher"}
    student = {r["id"]: r for r in rows if r["system"] == "student"}
    ids = sorted(set(teacher) & set(student))
    both = [i for i in ids if i in majority]
    generate = json.loads((run_dir / "samples" / "_manifest.json").read_text())["counts"]
    train = json.loads((run_dir / "student" / "_manifest.json").read_text())["counts"]
    return {
        "k": k, "run_dir": str(run_dir.relative_to(REPO)), "wall_s": round(time.time() - started, 1),
        "teacher_tokens": {"input": generate["input_tokens"], "output": generate["output_tokens"],
                           "samples": generate["rows"]},
        "votes": train.get("votes"),
        "agreement_single": share(sum(student[i]["label"] is not None and student[i]["label"] == teacher[i]["label"]
                                      for i in ids), len(ids)),
        "agreement_majority": share(sum(student[i]["label"] is not None and student[i]["label"] == majority[i]
                                        for i in both), len(both)),
        "accuracy": share(sum(student[i]["label"] == student[i]["gold"] for i in ids), len(ids)),
        "teacher_accuracy": share(sum(teacher[i]["label"] == teacher[i]["gold"] for i in ids), len(ids)),
        "majority_teacher_accuracy": share(sum(majority[i] == teacher[i]["gold"] for i in both), len(both)),
    }


def pct(part: dict[str, Any]) -> str:
    lo, hi = part["ci95"]
    return f"{100 * part['value']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def markdown(out: dict[str, Any]) -> str:
    h, p = out["host"], out["provenance"]
    lines = ["# Self-consistent teacher labels (teacher.votes)", "",
             f"`{p['command']}` at {p['commit']}, {p['date']}; host: {h['cpu']}, {h['cores']} cores, flags "
             f"{' '.join(h['flags']) or 'none of avx2/avx512'}.", "",
             f"Demo task (langid-long, SmolLM2-135M-Instruct teacher and student), 300 training queries; every k "
             f"samples at temperature {out['temperature']}. Held out: the demo's eval queries; the majority teacher "
             f"is the majority of {EVAL_VOTES} sampled votes on them.", "",
             "| k | teacher tokens in / out | mean vote share | agreement with single-vote teacher | agreement with "
             "majority teacher | student accuracy | wall |", "|---|---|---|---|---|---|---|"]
    for r in out["runs"]:
        votes = r.get("votes") or {}
        lines.append(f"| {r['k']} | {r['teacher_tokens']['input']:,} / {r['teacher_tokens']['output']:,} | "
                     f"{votes.get('mean_confidence', '-')} | {pct(r['agreement_single'])} | {pct(r['agreement_majority'])} | "
                     f"{pct(r['accuracy'])} | {r['wall_s']:.0f} s |")
    first = out["runs"][0]
    lines += ["", f"The teacher itself: single vote (greedy, served) {pct(first['teacher_accuracy'])} accurate; "
              f"majority of {EVAL_VOTES} {pct(first['majority_teacher_accuracy'])}.", "",
              "ratios: " + ", ".join(f"`{k}` {v}" for k, v in out["ratios"].items()), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 3, 5])
    parser.add_argument("--temperature", type=float, default=0.7)
    args = parser.parse_args()
    eval_run = REPO / "runs" / "bench-votes-eval-majority"
    run("generate", CONFIG, f"run_dir={eval_run}", "queries.train_path=builtin:langid-demo/eval",
        "teacher.max_rows=200", f"teacher.votes={EVAL_VOTES}", f"teacher.temperature={args.temperature}", "--overwrite")
    majority = majority_labels(eval_run)
    runs = [one_k(k, args.temperature, majority) for k in args.ks]
    by_k = {r["k"]: r for r in runs}
    ratios = {}
    if 1 in by_k and 5 in by_k:
        ratios["agreement_majority_k5_over_k1"] = round(by_k[5]["agreement_majority"]["value"]
                                                        / by_k[1]["agreement_majority"]["value"], 4)
        ratios["agreement_single_k5_over_k1"] = round(by_k[5]["agreement_single"]["value"]
                                                      / by_k[1]["agreement_single"]["value"], 4)
        ratios["accuracy_k5_over_k1"] = round(by_k[5]["accuracy"]["value"] / by_k[1]["accuracy"]["value"], 4)
    out = {"runs": runs, "temperature": args.temperature, "ratios": ratios, "host": host(),
           "provenance": {"command": "scripts/loopback-only .venv/bin/python bench/votes_bench.py "
                                     + " ".join(["--ks", *map(str, args.ks), "--temperature", str(args.temperature)]),
                          "commit": git_commit(), "config": CONFIG, "date": time.strftime("%Y-%m-%d")}}
    write_results("votes", out, markdown(out))


if __name__ == "__main__":
    main()
