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
            "latency_p95_s": percentile(latencies, 95),
            "latency_p99_s": percentile(latencies, 99),
            "throughput_rps": throughput(answered),
        }
    return out


def throughput(rows: Sequence[dict[str, Any]]) -> float | None:
    """Answered requests per second over the window from the first send to the last answer."""
    spans = [(r["started_at"], r["started_at"] + r["latency_s"]) for r in rows
             if r.get("started_at") is not None and r.get("latency_s") is not None]
    if not spans:
        return None
    window = max(end for _, end in spans) - min(start for start, _ in spans)
    return len(spans) / window if window > 0 else None


def accuracy_by_label(rows: Iterable[dict[str, Any]], system: str, labels: Sequence[str]) -> dict[str, float | None]:
    """Per gold label: the share of that label's queries the system labelled right (recall)."""
    hits: dict[str, list[bool]] = {label: [] for label in labels}
    for row in rows:
        if row["system"] == system and row.get("gold") in hits:
            hits[row["gold"]].append(row["label"] == row["gold"])
    return {label: (sum(h) / len(h) if h else None) for label, h in hits.items()}


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
