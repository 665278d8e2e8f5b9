"""Pure evaluation metrics over result rows (one row per query x system)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np


def percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else None


def system_metrics(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per system: accuracy vs gold, parse rate, error count, tokens and latency."""
    by_system: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_system[row["system"]].append(row)
    out: dict[str, dict[str, Any]] = {}
    for system, items in sorted(by_system.items()):
        answered = [r for r in items if not r.get("error")]
        gold = [r for r in items if r.get("gold") is not None]
        latencies = [r["latency_s"] for r in answered if r.get("latency_s") is not None]
        out[system] = {
            "requests": len(items),
            "errors": len(items) - len(answered),
            "accuracy": (sum(r["label"] == r["gold"] for r in gold) / len(gold)) if gold else None,
            "parse_rate": (sum(bool(r["valid"]) for r in items) / len(items)) if items else None,
            "mean_input_tokens": _mean(r.get("num_input_tokens") for r in answered),
            "mean_output_tokens": _mean(r.get("num_output_tokens") for r in answered),
            "latency_p50_s": percentile(latencies, 50),
            "latency_p99_s": percentile(latencies, 99),
        }
    return out


def agreement(rows: Iterable[dict[str, Any]], a: str, b: str) -> float | None:
    """Share of queries answered by both systems on which their parsed labels are equal."""
    labels: dict[str, dict[str, str | None]] = defaultdict(dict)
    for row in rows:
        if row["system"] in (a, b) and not row.get("error"):
            labels[row["id"]][row["system"]] = row["label"]
    pairs = [v for v in labels.values() if a in v and b in v]
    if not pairs:
        return None
    return sum(v[a] is not None and v[a] == v[b] for v in pairs) / len(pairs)


def confusion(rows: Iterable[dict[str, Any]], system: str, labels: Sequence[str]) -> np.ndarray:
    """Counts[gold, predicted] over ``labels`` plus a last column for unparsed answers."""
    index = {label: i for i, label in enumerate(labels)}
    matrix = np.zeros((len(labels), len(labels) + 1), dtype=np.int64)
    for row in rows:
        if row["system"] != system or row.get("gold") not in index:
            continue
        pred = index.get(row["label"], len(labels)) if row["label"] is not None else len(labels)
        matrix[index[row["gold"]], pred] += 1
    return matrix


def _mean(values: Iterable[Any]) -> float | None:
    nums = [float(v) for v in values if v is not None]
    return sum(nums) / len(nums) if nums else None
