"""The distillation recipe, measured: a learning curve and a recipe table for the demo's task.

    scripts/loopback-only .venv/bin/python research/langid/distill_bench.py [--sizes 100,300,1000] [--recipe-size 300]
        [--demo-run runs/demo]

Everything runs through raydistill's own stages on the demo config (``jobs/configs/demo_cpu.yaml``:
the long-prompt ``langid-long`` teacher, LoRA student): ``generate`` labels train queries once
(greedy, with the teacher's top-5 logprobs) and labels the eval split once (the reference the
students are compared with); every row then trains a student with ``train`` on a subset of those
samples and labels the eval split with it (plain vLLM, greedy, the student's served chat). Rows:

* learning curve: the number of teacher-labelled queries (``--sizes``), label target;
* recipe table at ``--recipe-size`` queries: label target vs the raw response vs KL on the
  teacher's top-5 (weight 0.5), and the student's system prompt (the chat template's default,
  to compare with the response row, whose task sets "none"); and 4 samples per query at temperature 1
  (the demo's recipe otherwise) on ``--k4-size`` queries, to compare with the curve's point of that size;
* teacher stability (``--stability-orders``): the teacher's own answers on the eval split when only
  the order of its demonstrations changes (plain vLLM, greedy, the same rendering as ``generate``),
  against its answers in ``generate``. The unshuffled prompt is the control (it measures engine
  noise). A student cannot be expected to copy the teacher more faithfully than the teacher copies
  itself under a change that should not matter.

Each row reports agreement with the teacher and student accuracy with 95% Wilson intervals
(eval split, ``n`` queries), and wall time (the teacher's share prorated by queries, plus
training). Small sizes train for at least ``MIN_EXAMPLE_PASSES`` example passes (more epochs).
``--demo-run`` copies a finished ``raydistill demo`` run's headline numbers (teacher vs student
served side by side) into ``ratios``. Writes ``research/langid/results/distill.{json,md}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from study import REPO, RESULTS, answer, repo_relative

CONFIG = REPO / "jobs" / "configs" / "demo_cpu.yaml"
MIN_EXAMPLE_PASSES = 300
RATIO_KEYS = ("input_tokens_teacher_over_student", "accuracy_student_over_teacher", "agreement", "agreement_ci95",
              "teacher_parse_rate", "rps_student_over_teacher")


def stable_order(query_id: str) -> str:
    return hashlib.sha256(f"bench:{query_id}".encode()).hexdigest()


def subset_samples(source: Path, target: Path, n_queries: int) -> int:
    """The samples of ``n_queries`` queries (a fixed pseudo-random choice, the same for every row)."""
    import pyarrow.parquet as pq

    from raydistill.schema import parquet_files

    table = pq.read_table(parquet_files(source))
    return write_queries(table, set(fixed_order(table)[:n_queries]), target)


def fixed_order(table) -> list[str]:
    """The table's query ids in the bench's fixed pseudo-random order (every row draws from it)."""
    return sorted(set(table["id"].to_pylist()), key=stable_order)


def write_queries(table, keep: set[str], target: Path) -> int:
    """The samples of the queries in ``keep``, as one Parquet file in ``target``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    target.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.filter(pa.array([i in keep for i in table["id"].to_pylist()])), target / "part-0.parquet")
    return len(keep)


def margin_subset(source: Path, target: Path, n_queries: int, pool: int) -> int:
    """``n_queries`` of the first ``pool`` queries: half of them the ones the teacher was least sure
    of (the smallest gap between the log-probabilities of its two likeliest first answer tokens),
    the rest the same fixed pseudo-random choice as ``subset_samples`` makes. More of the boundary
    the student has to copy, without losing the easy cases; labelling is cheaper than training."""
    import math

    import pyarrow.parquet as pq

    from raydistill.schema import parquet_files

    table = pq.read_table(parquet_files(source))
    ids = fixed_order(table)[:pool]
    in_pool, margins = set(ids), dict[str, float]()
    for r in table.select(["id", "top_logprobs"]).to_pylist():
        first = (r["top_logprobs"] or [[]])[0]
        gap = first[0] - first[1] if len(first) > 1 else math.inf
        if r["id"] in in_pool:
            margins[r["id"]] = min(margins.get(r["id"], math.inf), gap)
    unsure = set(sorted(ids, key=lambda i: margins[i])[: n_queries // 2])
    return write_queries(table, unsure | set([i for i in ids if i not in unsure][: n_queries - len(unsure)]), target)


def grow_teacher(samples: Path, n_queries: int) -> None:
    """A finished teacher run with fewer than ``n_queries`` queries becomes an interrupted one, so
    ``generate --resume`` labels only the missing queries (``teacher.max_rows`` takes the first
    rows of the train split, so the labelled ones are a prefix of the larger set)."""
    manifest = samples / "_manifest.json"
    if not manifest.is_file() or json.loads(manifest.read_text())["counts"]["queries"] >= n_queries:
        return
    manifest.unlink()
    samples.rename(samples.with_name(f".{samples.name}.partial"))


def teacher_stability(model: str, task: Any, queries: list[str], ids: list[str], teacher: dict[str, dict],
                      dtype: str, orders: int, work: Path) -> list[dict[str, Any]]:
    """The teacher against itself: its eval answers with the demonstrations in ``orders`` shuffled
    orders (plus the original order as the control), scored like a student against ``generate``'s."""
    import random

    from transformers import AutoTokenizer

    from raydistill.render import render_prompt

    tokenizer = AutoTokenizer.from_pretrained(model)
    rows = []
    for seed in range(orders + 1):  # seed 0: the prompt as written
        run = work / f"teacher-order-{seed}"
        run.mkdir(parents=True, exist_ok=True)
        if (run / "row.json").is_file():
            rows.append(json.loads((run / "row.json").read_text()))
            continue
        demos = list(task.demonstrations)
        if seed:
            random.Random(seed).shuffle(demos)
        variant = task.model_copy(update={"demonstrations": demos})
        prompts = [render_prompt(tokenizer, variant.teacher_messages(q), variant.assistant_prefix) for q in queries]
        answers = answer(model, dtype, prompts, run)
        result = {"name": "prompt as written (control)" if seed == 0 else f"demonstrations shuffled (seed {seed})",
                  "seed": seed, **score(teacher, answers, ids, task)}
        (run / "row.json").write_text(json.dumps(result, indent=2))
        print(f"teacher order {seed}: {result}", flush=True)
        rows.append(result)
    return rows


def stability_split(work: Path, rows: list[dict[str, Any]], stability: list[dict[str, Any]], teacher: dict[str, dict],
                    ids: list[str], task: Any) -> dict[str, Any]:
    """Split each row's agreement by whether the teacher's answer to the query survives every
    reordering of its demonstrations (stable) or changes under at least one (unstable)."""
    orders = [[task.parse(a).label for a in json.loads((work / f"teacher-order-{r['seed']}" / "answers.json").read_text())]
              for r in stability if r["seed"]]
    unstable = [any(o[i] != teacher[q]["label"] for o in orders) for i, q in enumerate(ids)]
    split: dict[str, Any] = {"unstable_queries": sum(unstable), "queries": len(ids), "rows": {}}
    for row in rows:
        answers = json.loads((work / row["name"] / "answers.json").read_text())
        agrees = [task.parse(a).label == teacher[q]["label"] for a, q in zip(answers, ids)]
        split["rows"][row["name"]] = {
            "agree_where_stable": sum(a for a, u in zip(agrees, unstable) if not u),
            "agree_where_unstable": sum(a for a, u in zip(agrees, unstable) if u),
            "disagreements_on_unstable": sum(not a and u for a, u in zip(agrees, unstable)),
            "disagreements": sum(not a for a in agrees)}
    return split


def by_label(work: Path, row: dict[str, Any], stability: list[dict[str, Any]], teacher: dict[str, dict],
             ids: list[str], task: Any) -> list[dict[str, Any]]:
    """Per gold label: how often the teacher is right, how often its answer survives every
    reordering, how often ``row``'s student agrees, and what the teacher answers: where the
    disagreements come from, and whether the teacher's answers there follow from the query."""
    from collections import Counter

    orders = [[task.parse(a).label for a in json.loads((work / f"teacher-order-{r['seed']}" / "answers.json").read_text())]
              for r in stability if r["seed"]]
    student = [task.parse(a).label for a in json.loads((work / row["name"] / "answers.json").read_text())]
    out: dict[str, dict[str, Any]] = {}
    for i, q in enumerate(ids):
        t = teacher[q]
        c = out.setdefault(t["gold"], {"label": t["gold"], "n": 0, "teacher_right": 0, "teacher_stable": 0, "agree": 0,
                                       "teacher_says": Counter()})
        c["n"] += 1
        c["teacher_right"] += t["label"] == t["gold"]
        c["teacher_stable"] += all(o[i] == t["label"] for o in orders)
        c["agree"] += student[i] == t["label"]
        c["teacher_says"][(t.get("response") or "").strip().rstrip(".")[:24] or "(nothing)"] += 1
    return [{**c, "teacher_says": dict(c["teacher_says"].most_common())} for _, c in sorted(out.items())]


def student_labels(model_dir: Path, task: Any, queries: list[str], dtype: str, work: Path) -> list[str]:
    from transformers import AutoTokenizer

    from raydistill.render import render_prompt

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [render_prompt(tokenizer, task.student_messages(q)) for q in queries]
    return answer(str(model_dir), dtype, prompts, work)


def score(teacher: dict[str, dict], student_answers: list[str], ids: list[str], task: Any) -> dict[str, Any]:
    from raydistill.evaluate.metrics import wilson_interval

    n = len(ids)
    labels = [task.parse(a).label for a in student_answers]
    agrees = [lab is not None and lab == teacher[i]["label"] for lab, i in zip(labels, ids)]
    agree = sum(agrees)
    right = sum(lab == teacher[i]["gold"] for lab, i in zip(labels, ids))
    # Where agreement is lost: copying the teacher's right answers is easy, its mistakes are not.
    teacher_right = [teacher[i]["label"] == teacher[i]["gold"] for i in ids]
    n_right = sum(teacher_right)
    split = {"teacher_right": n_right, "agree_where_teacher_right": sum(a for a, r in zip(agrees, teacher_right) if r),
             "agree_where_teacher_wrong": sum(a for a, r in zip(agrees, teacher_right) if not r)}
    return {"n": n, **split, "agreement": round(agree / n, 4),
            "agreement_ci95": [round(x, 4) for x in wilson_interval(agree, n)],
            "student_accuracy": round(right / n, 4),
            "student_accuracy_ci95": [round(x, 4) for x in wilson_interval(right, n)],
            "student_parse_rate": round(sum(lab is not None for lab in labels) / n, 4)}


def main() -> None:  # noqa: PLR0915 - a linear script: setup, teacher, rows, write
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,300,1000")
    parser.add_argument("--recipe-size", type=int, default=300)
    parser.add_argument("--k4-size", type=int, default=100, help="queries for the 4-samples row (compare label-<n>)")
    parser.add_argument("--recipes", default="response,kl,k4,system-default",
                        help="recipe rows at --recipe-size besides the label-target curve point "
                             "(also: kl-default, the demo's recipe plus the KL term; epochs2 / epochs3, "
                             "the demo's recipe with 2 or 3 passes; seeds, the demo's recipe with train.seed 1, 2, 3; margin, the demo's recipe on queries picked "
                             "by the teacher's uncertainty, see --margin-pool)")
    parser.add_argument("--recipe-curve", default="300,1000",
                        help="sizes for a second curve with the demo's recipe (response target, default system message)")
    parser.add_argument("--capacity", default="mlp-lora,full",
                        help="student-capacity rows at --recipe-size with the demo's recipe: LoRA on the MLP too, full FT")
    parser.add_argument("--margin-pool", type=int, default=1000,
                        help="--recipes margin: queries labelled, of which --recipe-size are trained on (half the "
                             "teacher's least sure, half random)")
    parser.add_argument("--stability-orders", type=int, default=3,
                        help="shuffled demonstration orders for the teacher-stability rows (0: none)")
    parser.add_argument("--work", default="runs/distill-bench")
    parser.add_argument("--results", default=str(RESULTS),
                        help="folder for distill.{json,md}: elsewhere for a partial run (a row or two) that should "
                             "not replace the committed results")
    parser.add_argument("--demo-run", default=None, help="a finished `raydistill demo` run to quote in ratios")
    parser.add_argument("--quote-only", action="store_true",
                        help="with --demo-run: only put that run's numbers into the existing results")
    args = parser.parse_args()
    if args.quote_only:
        out = json.loads((Path(args.results) / "distill.json").read_text())
        out.update(quote_demo(Path(args.demo_run)))
        write_results(out, Path(args.results))
        return
    sizes = sorted(int(s) for s in args.sizes.split(","))
    recipes = [r for r in args.recipes.split(",") if r]

    import pyarrow.parquet as pq

    from raydistill.config import load_config
    from raydistill.dtypes import engine_dtype
    from raydistill.schema import parquet_files
    from raydistill.student.train import train
    from raydistill.tasks.task import task_for
    from raydistill.teacher.generate import generate

    work = (REPO / args.work).resolve()
    base = load_config(CONFIG)
    if base.queries is None:
        raise SystemExit(f"{CONFIG} has tasks[]: this study runs a single-task config")
    recipe_sizes = sorted(int(s) for s in args.recipe_curve.split(",") if s)
    capacity = [c for c in args.capacity.split(",") if c]
    n_teacher = max([*sizes, *recipe_sizes, args.recipe_size, *([args.margin_pool] if "margin" in recipes else [])])
    common = [f"run_dir={work}/teacher", "train.checkpoint_every=0", "train.val_fraction=0.0"]

    def stage_config(extra: list[str]):
        return load_config(CONFIG, [*common, *extra])

    # 1. the teacher, once: train queries (with top-5 logprobs for the KL row) and the eval split
    timings: dict[str, float] = {}
    teacher_cfg = stage_config([f"teacher.max_rows={n_teacher}", "teacher.logprobs=5"])
    grow_teacher(work / "teacher" / "samples", n_teacher)
    t = time.time()
    generate(teacher_cfg, resume=True)
    timings["teacher_train_queries_s"] = time.time() - t
    eval_cfg = stage_config([f"run_dir={work}/teacher-eval", f"queries.train_path={base.queries.eval_path}",
                             "teacher.max_rows=100000"])
    generate(eval_cfg, resume=True)
    eval_table = pq.read_table(parquet_files(work / "teacher-eval" / "samples")).to_pylist()
    teacher = {r["id"]: r for r in eval_table}
    ids = sorted(teacher)
    queries = [teacher[i]["query"] for i in ids]
    task = task_for(base.task)
    n_eval = len(ids)
    teacher_acc = sum(teacher[i]["label"] == teacher[i]["gold"] for i in ids) / n_eval
    teacher_manifest = json.loads((work / "teacher" / "samples" / "_manifest.json").read_text())
    counts = teacher_manifest["counts"]  # a grown run timed only the queries it added
    per_query_s = counts["wall_s"] / max(1, counts["queries"] - counts.get("resumed_samples", 0))
    print(f"teacher: {n_eval} eval queries, accuracy {teacher_acc:.1%}; {per_query_s:.3f} s per train query", flush=True)

    def row(name: str, n_queries: int, overrides: list[str], samples_from: Path, sampled_s_per_query: float) -> dict:
        run = work / name
        if (run / "row.json").is_file():
            cached = json.loads((run / "row.json").read_text())
            if (run / "answers.json").is_file():  # re-score: the scoring may have grown since
                cached.update(score(teacher, json.loads((run / "answers.json").read_text()), ids, task_for(
                    stage_config([f"run_dir={run}", *overrides]).task)))
            return cached
        n_samples_dir = run / "samples"
        if not n_samples_dir.exists():
            subset_samples(samples_from, n_samples_dir, n_queries)
        rows_n = pq.read_metadata(n_samples_dir / "part-0.parquet").num_rows
        epochs = max(1, math.ceil(MIN_EXAMPLE_PASSES / rows_n))
        cfg = stage_config([f"run_dir={run}", f"train.epochs={epochs}", *overrides])
        t0 = time.time()
        train(cfg, overwrite=True)
        train_s = time.time() - t0
        student_task = task_for(cfg.task)  # the student's chat as it was trained
        answers = student_labels(run / "student" / "merged", student_task, queries,
                                 engine_dtype(cfg.serve.dtype, "cpu"), run)
        result = {"name": name, "queries": n_queries, "samples": rows_n, "epochs": cfg.train.epochs,
                  "target": cfg.train.target, "student_system_prompt": student_task.student_system_prompt,
                  **score(teacher, answers, ids, student_task), "teacher_s": round(n_queries * sampled_s_per_query, 1),
                  "train_s": round(train_s, 1), "overrides": overrides}
        result["wall_s"] = round(result["teacher_s"] + result["train_s"], 1)
        (run / "row.json").write_text(json.dumps(result, indent=2))
        print(f"row {name}: {result}", flush=True)
        return result

    samples = work / "teacher" / "samples"
    # label rows pin their recipe: the demo config's own (response target, default system message)
    # is another row, and a label row left to the config silently became a copy of it
    label_recipe = ["train.target=label", "task.student_system_prompt=none"]
    curve = [row(f"label-{n}", n, label_recipe, samples, per_query_s) for n in sizes]
    recipe_rows = [next((r for r in curve if r["queries"] == args.recipe_size), None)
                   or row(f"label-{args.recipe_size}", args.recipe_size, label_recipe, samples, per_query_s)]
    n = args.recipe_size
    if "response" in recipes:
        recipe_rows.append(row(f"response-{n}", n, ["train.target=response"], samples, per_query_s))
    if "kl" in recipes:
        recipe_rows.append(row(f"kl-{n}", n, ["train.target=response", "train.kl_weight=0.5", "teacher.logprobs=5"], samples, per_query_s))
    if "k4" in recipes:
        k_cfg = stage_config([f"run_dir={work}/teacher-k4", f"teacher.max_rows={args.k4_size}", "teacher.temperature=1.0",
                              "teacher.samples_per_query=4"])
        t = time.time()
        generate(k_cfg, resume=True)
        k_manifest = json.loads((work / "teacher-k4" / "samples" / "_manifest.json").read_text())
        k_per_query = k_manifest["counts"]["wall_s"] / max(1, k_manifest["counts"]["queries"])
        timings["teacher_k4_s"] = time.time() - t
        recipe_rows.append(row(f"k4-{args.k4_size}", args.k4_size, [], work / "teacher-k4" / "samples", k_per_query))
    demo_recipe = ["train.target=response", "task.student_system_prompt=default"]
    if "kl-default" in recipes:  # the two best single changes together
        recipe_rows.append(row(f"kl-default-{n}", n, [*demo_recipe, "train.kl_weight=0.5", "teacher.logprobs=5"],
                               samples, per_query_s))
    for passes in (2, 3):  # the demo's recipe, more passes over the same labels
        if f"epochs{passes}" in recipes:
            recipe_rows.append(row(f"epochs{passes}-default-{n}", n, [*demo_recipe, f"train.epochs={passes}"],
                                   samples, per_query_s))
    if "seeds" in recipes:  # the demo's recipe again with other seeds (data order, LoRA init): the training draw's noise
        for seed in (1, 2, 3):
            recipe_rows.append(row(f"seed{seed}-default-{n}", n, [*demo_recipe, f"train.seed={seed}"], samples, per_query_s))
    if "margin" in recipes:  # the demo's recipe on the queries the teacher was least sure of, half of them
        name = f"margin-{n}-of-{args.margin_pool}"
        if not (work / name / "samples").exists():
            margin_subset(samples, work / name / "samples", n, args.margin_pool)
        recipe_rows.append(row(name, n, demo_recipe, samples, per_query_s * args.margin_pool / n))
    if "system-default" in recipes:  # the student's system message: none (an empty turn) vs the template's default
        for choice in ("none", "default"):
            recipe_rows.append(row(f"system-{choice}-{n}", n, ["train.target=response", f"task.student_system_prompt={choice}"],
                                   samples, per_query_s))

    # The demo's recipe (what jobs/configs/demo_cpu.yaml trains) over the number of queries, and
    # with more student capacity: where does agreement reach 90%?
    recipe_curve = [row(f"system-default-{n}", n, demo_recipe, samples, per_query_s) for n in recipe_sizes]
    all_linear = "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
    capacity_overrides = {"mlp-lora": [f"train.lora_target_modules={all_linear}"],
                          "full": ["train.method=full", "train.learning_rate=1e-4"]}
    capacity_rows = [row(f"{c}-{n}", n, [*demo_recipe, *capacity_overrides[c]], samples, per_query_s) for c in capacity]

    stability: list[dict[str, Any]] = []
    split: dict[str, Any] = {}
    per_label: list[dict[str, Any]] = []
    if args.stability_orders and task.demonstrations:
        from raydistill.models import resolve_model

        stability = teacher_stability(resolve_model(base.teacher.model), task, queries, ids, teacher,
                                      engine_dtype(base.teacher.dtype, "cpu"), args.stability_orders, work)
        split = stability_split(work, recipe_curve, stability, teacher, ids, task)
        per_label = by_label(work, recipe_curve[0], stability, teacher, ids, task) if recipe_curve else []

    out = {
        "command": "python research/langid/distill_bench.py " + " ".join(sys.argv[1:]),
        "config": str(CONFIG.relative_to(REPO)), "task": task.name, "eval_queries": n_eval,
        "teacher": {"eval_accuracy": round(teacher_acc, 4), "seconds_per_query": round(per_query_s, 3),
                    "eval_parse_rate": round(sum(teacher[i]["valid"] for i in ids) / n_eval, 4)},
        "min_example_passes": MIN_EXAMPLE_PASSES, "learning_curve": curve, "recipes": recipe_rows,
        "recipe_curve": recipe_curve, "capacity": capacity_rows, "teacher_stability": stability,
        "stability_split": split, "by_label": per_label,
        "by_label_row": recipe_curve[0]["name"] if per_label else None, "timings": timings,
    }
    if args.demo_run:
        out.update(quote_demo(Path(args.demo_run)))
    results = Path(args.results)
    previous = json.loads((results / "distill.json").read_text()) if (results / "distill.json").is_file() else {}
    if "ratios" not in out and "ratios" in previous:  # keep the demo's numbers when only the bench re-ran
        out["ratios"], out["ratios_source"] = previous["ratios"], previous.get("ratios_source")
    write_results(out, results)


def quote_demo(run: Path) -> dict[str, Any]:
    """The headline of a finished demo run (teacher and student served side by side)."""
    manifest = json.loads((run / "eval" / "_manifest.json").read_text())
    return {"ratios": {k: manifest["metrics"]["payoff"].get(k) for k in RATIO_KEYS},
            "ratios_source": f"{repo_relative(run)}/eval/_manifest.json (raydistill demo at git {manifest.get('git_revision', '?')})"}


def write_results(out: dict[str, Any], folder: Path = RESULTS) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "distill.json").write_text(json.dumps(out, indent=2) + "\n")
    (folder / "distill.md").write_text(render_markdown(out))
    print(render_markdown(out), flush=True)


def where_it_reaches(curve: list[dict], target: float) -> str:
    """Where a learning curve first reaches ``target`` agreement (point estimate and lower bound)."""
    rows = sorted(curve, key=lambda r: r["queries"])
    point = next((r for r in rows if r["agreement"] >= target), None)
    bound = next((r for r in rows if r["agreement_ci95"][0] >= target), None)
    if point is None:
        last = rows[-1]
        return (f"{target:.0%} agreement is not reached at the largest size measured ({last['queries']:,} queries: "
                f"{100 * last['agreement']:.1f}%).")
    text = f"{target:.0%} agreement is first reached at {point['queries']:,} teacher-labelled queries (point estimate)"
    if bound is None:
        return text + "; no size measured has its whole 95% interval above it."
    return text + f"; its whole 95% interval is above it from {bound['queries']:,} queries."


def render_markdown(out: dict[str, Any]) -> str:
    def pct(x: float) -> str:
        return f"{100 * x:.1f}%"

    def ci(pair: list[float]) -> str:
        return f"[{100 * pair[0]:.1f}, {100 * pair[1]:.1f}]"

    def table(rows: list[dict]) -> list[str]:
        lines = ["| row | queries | samples | epochs | agreement [95% CI] | agrees where teacher right / wrong | "
                 "student accuracy [95% CI] | student parse | wall (teacher + train) |",
                 "|---|---:|---:|---:|---|---|---|---:|---:|"]
        for r in rows:
            split = "—"
            if "teacher_right" in r:
                wrong = r["n"] - r["teacher_right"]
                split = (f"{r['agree_where_teacher_right']}/{r['teacher_right']} "
                         f"({pct(r['agree_where_teacher_right'] / r['teacher_right'])}) / "
                         f"{r['agree_where_teacher_wrong']}/{wrong} ({pct(r['agree_where_teacher_wrong'] / wrong)})")
            lines.append(f"| {r['name']} | {r['queries']} | {r['samples']} | {r['epochs']} | {pct(r['agreement'])} "
                         f"{ci(r['agreement_ci95'])} | {split} | {pct(r['student_accuracy'])} {ci(r['student_accuracy_ci95'])} | "
                         f"{pct(r['student_parse_rate'])} | {r['wall_s']:.0f} s ({r['teacher_s']:.0f} + {r['train_s']:.0f}) |")
        return lines

    t = out["teacher"]
    lines = ["# Distillation recipe: learning curve and recipe table", "",
             f"`{out['command']}` on `{out['config']}` (task `{out['task']}`); {out['eval_queries']} eval queries. "
             f"Teacher on the eval split: accuracy {pct(t['eval_accuracy'])}, parse rate {pct(t['eval_parse_rate'])}, "
             f"{t['seconds_per_query']} s per labelled train query.", "", "## Learning curve (label target)", "",
             *table(out["learning_curve"]), "", "## Recipes", "", *table(out["recipes"]), "",
             "Rows train on the teacher's response unless named label-; the student's system message is the "
             "task's (" + ", ".join(f"{r['name']}: {r.get('student_system_prompt', '?')}" for r in out["recipes"]) + ").",
             ""]
    if out.get("recipe_curve"):
        lines += ["## Learning curve (the demo's recipe: response target, default system message)", "",
                  *table(out["recipe_curve"]), "", where_it_reaches(out["recipe_curve"], 0.90), ""]
    if out.get("capacity"):
        lines += ["## Student capacity (the demo's recipe)", "", *table(out["capacity"]), "",
                  "mlp-lora: LoRA rank 16 on the attention and MLP projections (the demo: attention only); "
                  "full: every weight trained (learning rate 1e-4).", ""]
    if out.get("teacher_stability"):
        lines += ["## Teacher stability: the teacher against itself", "",
                  "The teacher's eval answers when only the order of its demonstrations changes, scored against "
                  "its answers in `generate` exactly as the students are. The control renders the prompt as written.",
                  "", "| prompt | agreement with the teacher [95% CI] | accuracy [95% CI] | parse |", "|---|---|---|---:|"]
        lines += [f"| {r['name']} | {pct(r['agreement'])} {ci(r['agreement_ci95'])} | {pct(r['student_accuracy'])} "
                  f"{ci(r['student_accuracy_ci95'])} | {pct(r['student_parse_rate'])} |" for r in out["teacher_stability"]]
        shuffled = [r["agreement"] for r in out["teacher_stability"] if r["seed"]]
        students = [r["agreement"] for r in out.get("recipe_curve", [])]
        if shuffled and students:
            lines += ["", f"Reordering its own demonstrations changes {pct(1 - max(shuffled))}–{pct(1 - min(shuffled))} of the "
                      f"teacher's answers (agreement {pct(min(shuffled))}–{pct(max(shuffled))}, mean "
                      f"{pct(sum(shuffled) / len(shuffled))}); the demo recipe's students agree with it on "
                      f"{pct(min(students))}–{pct(max(students))}. The answers a student misses are largely ones the "
                      "teacher itself does not hold to under a change that should not matter:"]
        split = out.get("stability_split")
        if split:
            n_u, n = split["unstable_queries"], split["queries"]
            lines += ["", f"{n_u} of {n} eval queries get a different teacher answer under at least one reordering.", "",
                      "| row | agreement where the teacher is stable | where it is not | disagreements on unstable queries |",
                      "|---|---|---|---|"]
            for name, r in split["rows"].items():
                lines.append(f"| {name} | {r['agree_where_stable']}/{n - n_u} ({pct(r['agree_where_stable'] / (n - n_u))}) | "
                             f"{r['agree_where_unstable']}/{n_u} ({pct(r['agree_where_unstable'] / n_u)}) | "
                             f"{r['disagreements_on_unstable']} of {r['disagreements']} |")
        lines += [""]
    if out.get("by_label"):
        name = out.get("by_label_row") or out["recipe_curve"][0]["name"]
        lines += [f"## Where agreement is lost, by language ({name})", "",
                  "Per gold label of the eval split: the teacher's accuracy, how many of its answers survive every "
                  "reordering of its demonstrations, the student's agreement with it, and what the teacher answers.", "",
                  "| label | queries | teacher right | teacher stable | student agrees | the teacher says |",
                  "|---|---:|---:|---:|---:|---|"]
        for r in out["by_label"]:
            says = ", ".join(f"{k} {v}" for k, v in r["teacher_says"].items())
            lines.append(f"| {r['label']} | {r['n']} | {r['teacher_right']} | {r['teacher_stable']} | {r['agree']} | {says} |")
        worst = [r for r in sorted(out["by_label"], key=lambda r: r["agree"] - r["n"]) if r["agree"] < r["n"]][:3]
        lost = sum(r["n"] - r["agree"] for r in out["by_label"])
        lines += ["", f"{sum(r['n'] - r['agree'] for r in worst)} of the {lost} disagreements are on "
                  + ", ".join(f"`{r['label']}`" for r in worst) + ": labels where the teacher splits its answers "
                  "between names (the table's last column), a split the bare query does not decide."]
        copied = [r for r in out["by_label"] if r["teacher_right"] < r["n"] / 2 and r["agree"] >= 0.9 * r["n"]]
        if copied:
            lines += ["A mistake the teacher makes every time is copied: "
                      + ", ".join(f"`{r['label']}` (teacher right {r['teacher_right']}/{r['n']}, student agrees "
                                  f"{r['agree']}/{r['n']})" for r in copied) + "."]
        lines += [""]
    if out.get("notes"):
        lines += ["", out["notes"]]
    if out.get("ratios"):
        r = out["ratios"]
        lines += ["", f"## The demo's headline ({out.get('ratios_source')})", "", "| key | value |", "|---|---:|"]
        lines += [f"| {k} | {r[k]} |" for k in RATIO_KEYS if k in r]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
