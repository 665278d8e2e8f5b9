"""Pure evaluation metrics over result rows (one row per query x system)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

UNPARSED = "unparsed"  # the row/column of the agreement matrix for answers without a label


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
        correct = sum(r["label"] == r["gold"] for r in gold)
        latencies = [r["latency_s"] for r in answered if r.get("latency_s") is not None]
        out[system] = {
            "requests": len(items),
            "errors": len(items) - len(answered),
            "accuracy": correct / len(gold) if gold else None,
            "accuracy_ci95": list(wilson_interval(correct, len(gold))) if gold else None,
            "scored": len(gold),  # requests with a gold label: the accuracy's n
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
    agreed, n = agreement_counts(rows, a, b)
    return agreed / n if n else None


def agreement_counts(rows: Iterable[dict[str, Any]], a: str, b: str) -> tuple[int, int]:
    """(queries with equal parsed labels, queries answered by both); unparsed never agrees."""
    pairs = paired(rows, a, b)
    return sum(ra["label"] is not None and ra["label"] == rb["label"] for ra, rb in pairs), len(pairs)


def paired(rows: Iterable[dict[str, Any]], a: str, b: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(row of ``a``, row of ``b``) for each query both answered without error, by id.

    Errored requests are left out: they say nothing about whether ``b`` answers like ``a``.
    """
    by_id: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for row in rows:
        if row["system"] in (a, b) and not row.get("error"):
            by_id[row["id"]][row["system"]] = row
    return [(v[a], v[b]) for _, v in sorted(by_id.items()) if a in v and b in v]


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion (95% with z=1.96).

    Unlike p ± z·se it stays inside [0, 1] and does not collapse to a point at 0/n or n/n,
    which matters at eval-set sizes of tens to hundreds. With n = 0 nothing is known: (0, 1).
    """
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # Pin the ends exactly where the formula gives them up to rounding.
    lo = 0.0 if successes <= 0 else max(0.0, centre - half)
    hi = 1.0 if successes >= n else min(1.0, centre + half)
    return lo, hi


def agreement_matrix(rows: Iterable[dict[str, Any]], a: str, b: str, labels: Sequence[str]) -> np.ndarray:
    """Counts[label of ``a``, label of ``b``] over ``labels`` + a last row/column for unparsed,
    over the queries both answered (so the diagonal without its last cell sums to the agreed count)."""
    index = {label: i for i, label in enumerate(labels)}
    matrix = np.zeros((len(labels) + 1, len(labels) + 1), dtype=np.int64)
    for ra, rb in paired(rows, a, b):
        matrix[index.get(ra["label"], len(labels)), index.get(rb["label"], len(labels))] += 1
    return matrix


def agreement_by_label(rows: Iterable[dict[str, Any]], a: str, b: str,
                       labels: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per label of ``a`` (plus ``unparsed``): n, and the share where ``b`` gave the same label.

    Where ``a`` gave no label there is nothing to agree with, so that row has n only.
    """
    counts = {label: [0, 0] for label in [*labels, UNPARSED]}
    for ra, rb in paired(rows, a, b):
        key = ra["label"] if ra["label"] in counts and ra["label"] != UNPARSED else UNPARSED
        counts[key][1] += 1
        counts[key][0] += key != UNPARSED and rb["label"] == ra["label"]
    out: dict[str, dict[str, Any]] = {}
    for label, (agreed, n) in counts.items():
        defined = n > 0 and label != UNPARSED
        out[label] = {"n": n, "agreement": agreed / n if defined else None,
                      "ci95": list(wilson_interval(agreed, n)) if defined else None}
    return out


def token_savings(metrics: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """Mean input tokens per request of teacher and student, their ratio, and what the student saves."""
    teacher = metrics.get("teacher", {}).get("mean_input_tokens")
    student = metrics.get("student", {}).get("mean_input_tokens")
    saved = teacher - student if teacher is not None and student is not None else None
    return {"teacher_input_tokens": teacher, "student_input_tokens": student,
            "teacher_over_student": _ratio(teacher, student), "saved_per_request": saved,
            "saved_per_million_requests": saved * 1e6 if saved is not None else None}


def disagreements(rows: Iterable[dict[str, Any]], *, limit: int = 15, max_chars: int = 80) -> list[dict[str, Any]]:
    """Up to ``limit`` queries where teacher and student disagree (as in ``agreement``), texts truncated.

    Those the teacher got right and the student wrong come first (what replacing the teacher
    costs), then those only the student got right, then the rest; by id within each group, so
    the list is the same on every run.
    """
    def rank(pair: tuple[dict[str, Any], dict[str, Any]]) -> int:
        teacher, student = pair
        gold = teacher.get("gold")
        if gold is None:
            return 2
        return 0 if teacher["label"] == gold else 1 if student["label"] == gold else 2

    differ = [p for p in paired(rows, "teacher", "student") if p[0]["label"] is None or p[0]["label"] != p[1]["label"]]
    differ.sort(key=rank)  # a stable sort: ids stay in order within a group
    return [{"id": t["id"], "query": truncate(t.get("query"), max_chars), "gold": t.get("gold"),
             "teacher_label": t["label"], "student_label": s["label"],
             "teacher_answer": truncate(t.get("answer"), max_chars), "student_answer": truncate(s.get("answer"), max_chars)}
            for t, s in differ[:limit]]


def truncate(text: str | None, max_chars: int) -> str | None:
    if text is None or len(text) <= max_chars:
        return text
    return text[: max_chars - 1] + "…"


def compare(rows: Sequence[dict[str, Any]], metrics: dict[str, dict[str, Any]],
            labels: Sequence[str]) -> dict[str, Any]:
    """Everything on whether the student can replace the teacher, JSON-ready (the manifest holds it)."""
    agreed, n = agreement_counts(rows, "student", "teacher")
    return {
        "agreed": agreed, "n": n, "agreement": agreed / n if n else None,
        "agreement_ci95": list(wilson_interval(agreed, n)) if n else None,
        "matrix_labels": [*labels, UNPARSED],
        # rows: the teacher's label, columns: the student's
        "matrix": agreement_matrix(rows, "teacher", "student", labels).tolist(),
        "by_teacher_label": agreement_by_label(rows, "teacher", "student", labels),
        "tokens": token_savings(metrics),
        "disagreements": disagreements(rows),
    }


def payoff(metrics: dict[str, dict[str, Any]], comparison: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of distillation, teacher vs student (keys shared with the bench results)."""
    teacher, student = metrics.get("teacher", {}), metrics.get("student", {})
    return {
        "input_tokens_teacher_over_student": _ratio(teacher.get("mean_input_tokens"), student.get("mean_input_tokens")),
        "accuracy_student_over_teacher": _ratio(student.get("accuracy"), teacher.get("accuracy")),
        "agreement": comparison["agreement"],
        "agreement_ci95": comparison["agreement_ci95"],
        "teacher_parse_rate": teacher.get("parse_rate"),
        "rps_student_over_teacher": _ratio(student.get("throughput_rps"), teacher.get("throughput_rps")),
    }


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


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def _mean(values: Iterable[Any]) -> float | None:
    nums = [float(v) for v in values if v is not None]
    return sum(nums) / len(nums) if nums else None
