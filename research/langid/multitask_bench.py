"""Does sharing hurt? One student for several tasks vs one student per task, on the same data.

    scripts/loopback-only .venv/bin/python research/langid/multitask_bench.py [--run runs/demo-multi]

``--run`` is a finished ``raydistill run jobs/configs/demo_multi_cpu.yaml`` (run first if it is
missing): its teacher samples, its joint student and its evaluation (the teacher's answers to
every task's eval queries, served with each task's prompt). For each task the bench trains a
single-task student with the same recipe on exactly that task's samples (the same tag, so the
input format is identical; only the other tasks' data is missing), then the joint student and
every single-task student answer the task's eval queries (plain vLLM, greedy, the served chat
and forced answer prefix). Per task: agreement with the teacher and accuracy, with 95% Wilson
intervals, and ``ratios.agreement_joint_over_single``. Writes
``research/langid/results/multitask.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from study import REPO, RESULTS, answer, repo_relative

CONFIG = REPO / "jobs" / "configs" / "demo_multi_cpu.yaml"


def student_answers(model_dir: Path, spec: Any, queries: list[str], prefix: str, dtype: str, max_tokens: int,
                    work: Path) -> list[str]:
    """The student's answers as Serve gives them: its chat template around the tagged query, the
    forced answer prefix prefilled (returned as part of the answer)."""
    from transformers import AutoTokenizer

    from raydistill.render import render_prompt

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [render_prompt(tokenizer, spec.student_messages(q), prefix) for q in queries]
    return [prefix + a for a in answer(str(model_dir), dtype, prompts, work, max_tokens)]


def score(teacher_rows: list[dict[str, Any]], answers: list[str], spec: Any) -> dict[str, Any]:
    from raydistill.evaluate.metrics import wilson_interval

    labels = [spec.parse(a).label for a in answers]
    n = len(labels)
    agree = sum(lab is not None and lab == r["label"] for lab, r in zip(labels, teacher_rows))
    right = sum(lab == r["gold"] for lab, r in zip(labels, teacher_rows))
    return {"n": n, "agreement": round(agree / n, 4), "agreement_ci95": [round(x, 4) for x in wilson_interval(agree, n)],
            "accuracy": round(right / n, 4), "accuracy_ci95": [round(x, 4) for x in wilson_interval(right, n)],
            "parse_rate": round(sum(lab is not None for lab in labels) / n, 4)}


def single_task_student(cfg: Any, task_entry: Any, run: Path, work: Path) -> tuple[Path, float]:
    """Train the task's own student: the joint run's samples of that task, the same recipe."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from raydistill.student.train import train

    single = work / f"single-{task_entry.tag}"
    merged = single / "student" / "merged"
    if (single / "student" / "_manifest.json").is_file():
        return merged, json.loads((single / "student" / "_manifest.json").read_text())["wall_time_s"]
    shutil.rmtree(single, ignore_errors=True)
    (single / "samples").mkdir(parents=True)
    table = pq.read_table(run / "samples")
    pq.write_table(table.filter(pc.equal(table["task"], task_entry.tag)), single / "samples" / "part-0.parquet")
    (single / "samples" / "_manifest.json").write_text("{}")
    single_cfg = cfg.model_copy(update={"run_dir": str(single), "tasks": [task_entry]})
    t = time.time()
    train(single_cfg, overwrite=True)
    return merged, round(time.time() - t, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=str(REPO / "runs" / "demo-multi"), help="a finished demo_multi_cpu run")
    parser.add_argument("--work", default=str(REPO / "runs" / "multitask-bench"), help="single-task runs go here")
    args = parser.parse_args()
    os.chdir(REPO)  # the config's run_dir is relative to the repository

    import pyarrow.parquet as pq

    from raydistill.config import load_config
    from raydistill.dtypes import engine_dtype
    from raydistill.pipeline import run_pipeline
    from raydistill.tasks.pipeline_tasks import run_tasks

    run, work = Path(args.run).resolve(), Path(args.work).resolve()
    cfg = load_config(CONFIG, [f"run_dir={run}"])
    if not (run / "eval" / "_manifest.json").is_file():
        run_pipeline(cfg, resume=True)
    assert cfg.tasks is not None
    tasks = run_tasks(cfg)
    results = pq.read_table(run / "eval" / "results").to_pylist()
    joint_train_s = json.loads((run / "student" / "_manifest.json").read_text())["wall_time_s"]
    dtype = engine_dtype(cfg.serve.dtype, "cpu")
    out: dict[str, Any] = {"tasks": {}, "joint_train_s": joint_train_s, "ratios": {}}
    for task, entry in zip(tasks, cfg.tasks):
        teacher_rows = sorted((r for r in results if r["task"] == task.key and r["system"] == "teacher" and not r["error"]),
                              key=lambda r: r["id"])
        queries = [r["query"] for r in teacher_rows]
        prefix = task.spec.assistant_prefix if cfg.train.target == "response" else ""
        single_dir, single_s = single_task_student(cfg, entry, run, work)
        row: dict[str, Any] = {"task": task.spec.name, "eval_queries": len(queries), "single_train_s": single_s,
                               "teacher_accuracy": round(sum(r["label"] == r["gold"] for r in teacher_rows) / len(teacher_rows), 4)}
        for name, model in (("joint", run / "student" / "merged"), ("single", single_dir)):
            answers = student_answers(model, task.spec, queries, prefix, dtype, cfg.eval.max_tokens, work / f"answers-{name}-{task.key}")
            row[name] = score(teacher_rows, answers, task.spec)
            print(f"[bench] {task.key} {name}: {row[name]}", flush=True)  # noqa: T201
        out["tasks"][task.key] = row
        out["ratios"].setdefault("agreement_joint_over_single", {})[task.key] = round(
            row["joint"]["agreement"] / row["single"]["agreement"], 4) if row["single"]["agreement"] else None
        out["ratios"].setdefault("accuracy_joint_over_single", {})[task.key] = round(
            row["joint"]["accuracy"] / row["single"]["accuracy"], 4) if row["single"]["accuracy"] else None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    out["provenance"] = {"command": "scripts/loopback-only .venv/bin/python research/langid/multitask_bench.py", "commit": commit,
                         "config": str(CONFIG.relative_to(REPO)), "run": repo_relative(run)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "multitask.json").write_text(json.dumps(out, indent=2) + "\n")
    (RESULTS / "multitask.md").write_text(render(out))
    print(render(out))  # noqa: T201


def render(out: dict[str, Any]) -> str:
    def cell(m: dict[str, Any], key: str) -> str:
        lo, hi = m[f"{key}_ci95"]
        return f"{100 * m[key]:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"

    lines = ["# One student for several tasks vs one per task", "",
             f"`{out['provenance']['command']}` at {out['provenance']['commit']} ({out['provenance']['config']}); "
             "the same teacher samples, recipe and tag; eval queries of each task, greedy.", "",
             "| task | eval queries | teacher accuracy | agreement joint | agreement single | joint / single | "
             "accuracy joint | accuracy single |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key, row in out["tasks"].items():
        lines.append(f"| {key} | {row['eval_queries']} | {100 * row['teacher_accuracy']:.1f}% | {cell(row['joint'], 'agreement')} | "
                     f"{cell(row['single'], 'agreement')} | {out['ratios']['agreement_joint_over_single'][key]} | "
                     f"{cell(row['joint'], 'accuracy')} | {cell(row['single'], 'accuracy')} |")
    lines += ["", "One draw: one training seed per student and one set of eval queries per task (95% Wilson "
              "intervals); a difference smaller than the intervals is not evidence either way. Agreement is "
              "with the teacher's answers as served in the run's evaluation.", "",
              f"Training wall time: joint {out['joint_train_s']:.0f} s; single "
              + ", ".join(f"{k} {r['single_train_s']:.0f} s" for k, r in out["tasks"].items())
              + " (the machine was shared with other jobs).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
