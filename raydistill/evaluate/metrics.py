"""Pure evaluation metrics over result rows (one row per query x system).

Two ways in: lists of row dicts (the functions below), and mergeable accumulators
(``SystemStats`` per system, ``PairStats`` for teacher vs student) that Ray tasks fill from
result files of any size and the driver adds up (``evaluate.collect_stats``). The row functions
are the accumulators filled from one list, so both give the same numbers.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

UNPARSED = "unparsed"  # the row/column of the agreement matrix for answers without a label


def percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else None


class LatencySketch:
    """Latencies for percentiles and the CDF plot in bounded memory: the exact values up to
    ``exact_limit`` of them, then counts in log-spaced bins 1% wide from 0.1 ms to 10^5 s
    (2,083 bins, 17 kB), so a percentile is within 0.5% of the exact one."""

    LOW, HIGH, RATIO = 1e-4, 1e5, 1.01
    BINS = math.ceil(math.log(HIGH / LOW) / math.log(RATIO))

    def __init__(self, exact_limit: int = 100_000):
        self.exact_limit = exact_limit
        self.values: list[float] = []
        self.counts: np.ndarray | None = None  # bin counts once over the limit

    def __len__(self) -> int:
        return len(self.values) if self.counts is None else int(self.counts.sum())

    def add(self, value: float) -> None:
        if self.counts is None:
            self.values.append(float(value))
            if len(self.values) > self.exact_limit:
                self._to_bins()
        else:
            self.counts[self._bin(np.asarray([value]))] += 1

    def merge(self, other: LatencySketch) -> None:
        if self.counts is None and other.counts is None and len(self.values) + len(other.values) <= self.exact_limit:
            self.values.extend(other.values)
            return
        self._to_bins()
        self.counts = self.counts + (other.counts if other.counts is not None  # type: ignore[operator]
                                     else np.bincount(self._bin(np.asarray(other.values)), minlength=self.BINS))

    def percentile(self, q: float) -> float | None:
        if self.counts is None:
            return percentile(self.values, q)
        n = int(self.counts.sum())
        if n == 0:
            return None
        rank = q / 100 * (n - 1)  # numpy's default (linear) definition, to the bin
        i = int(np.searchsorted(np.cumsum(self.counts), rank, side="right"))
        return float(self.LOW * self.RATIO ** (min(i, self.BINS - 1) + 0.5))

    def points(self, n: int = 2_000) -> list[float]:
        """Values whose empirical CDF is this one's (all of them while exact, else n quantiles)."""
        if self.counts is None:
            return list(self.values)
        return [v for q in np.linspace(0, 100, n) if (v := self.percentile(float(q))) is not None]

    def _bin(self, values: np.ndarray) -> np.ndarray:
        clipped = np.clip(values.astype(float), self.LOW, self.HIGH)
        return np.minimum((np.log(clipped / self.LOW) / math.log(self.RATIO)).astype(np.int64), self.BINS - 1)

    def _to_bins(self) -> None:
        if self.counts is None:
            self.counts = np.bincount(self._bin(np.asarray(self.values)), minlength=self.BINS).astype(np.int64)
            self.values = []


class Span:
    """Answered requests with a send time and a latency: how many, first send, last answer."""

    def __init__(self) -> None:
        self.n, self.first, self.last = 0, math.inf, -math.inf

    def add(self, row: dict[str, Any]) -> None:
        if row.get("started_at") is not None and row.get("latency_s") is not None:
            self.n += 1
            self.first = min(self.first, row["started_at"])
            self.last = max(self.last, row["started_at"] + row["latency_s"])

    def merge(self, other: Span) -> None:
        self.n, self.first, self.last = self.n + other.n, min(self.first, other.first), max(self.last, other.last)

    def throughput(self) -> float | None:
        """Answered requests per second over the window from the first send to the last answer."""
        if not self.n:
            return None
        window = self.last - self.first
        return self.n / window if window > 0 else None


class SystemStats:
    """Mergeable sums over one system's result rows: all that ``system_metrics``, ``confusion``
    and ``accuracy_by_label`` need, in memory that does not grow with the rows (but for the
    latency sketch's first 100,000 exact values)."""

    def __init__(self) -> None:
        self.requests = self.errors = self.valid = 0
        self.gold_label: Counter[tuple[str, str | None]] = Counter()  # (gold, label) of rows with a gold label
        self.tokens = {"num_input_tokens": [0.0, 0], "num_output_tokens": [0.0, 0]}  # answered: sum, count
        self.latency = LatencySketch()
        self.span = Span()

    def add(self, row: dict[str, Any]) -> None:
        self.requests += 1
        self.valid += bool(row["valid"])
        # a free-form answer (valid, no label) has no accuracy, whatever the query file's gold says
        if row.get("gold") is not None and not (row["valid"] and row["label"] is None):
            self.gold_label[(row["gold"], row["label"])] += 1
        if row.get("error"):
            self.errors += 1
            return
        for key, acc in self.tokens.items():
            if row.get(key) is not None:
                acc[0] += float(row[key])
                acc[1] += 1
        if row.get("latency_s") is not None:
            self.latency.add(row["latency_s"])
        self.span.add(row)

    def merge(self, other: SystemStats) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.valid += other.valid
        self.gold_label.update(other.gold_label)
        for key, acc in self.tokens.items():
            acc[0] += other.tokens[key][0]
            acc[1] += other.tokens[key][1]
        self.latency.merge(other.latency)
        self.span.merge(other.span)

    def metrics(self) -> dict[str, Any]:
        """Accuracy vs gold, parse rate, error count, tokens and latency."""
        scored = sum(self.gold_label.values())
        correct = sum(n for (gold, label), n in self.gold_label.items() if label == gold)
        mean = {k: (s / n if n else None) for k, (s, n) in self.tokens.items()}
        return {
            "requests": self.requests,
            "errors": self.errors,
            "accuracy": correct / scored if scored else None,
            "accuracy_ci95": list(wilson_interval(correct, scored)) if scored else None,
            "scored": scored,  # requests with a gold label: the accuracy's n
            "parse_rate": self.valid / self.requests if self.requests else None,
            "mean_input_tokens": mean["num_input_tokens"],
            "mean_output_tokens": mean["num_output_tokens"],
            "latency_p50_s": self.latency.percentile(50),
            "latency_p95_s": self.latency.percentile(95),
            "latency_p99_s": self.latency.percentile(99),
            "throughput_rps": self.span.throughput(),
        }

    def confusion(self, labels: Sequence[str]) -> np.ndarray:
        """Counts[gold, predicted] over ``labels`` plus a last column for unparsed answers."""
        index = {label: i for i, label in enumerate(labels)}
        matrix = np.zeros((len(labels), len(labels) + 1), dtype=np.int64)
        for (gold, label), n in self.gold_label.items():
            if gold in index:
                matrix[index[gold], index.get(label, len(labels)) if label is not None else len(labels)] += n
        return matrix

    def accuracy_by_label(self, labels: Sequence[str]) -> dict[str, float | None]:
        """Per gold label: the share of that label's queries the system labelled right (recall)."""
        matrix = self.confusion(labels)
        return {label: (int(matrix[i, i]) / int(matrix[i].sum()) if matrix[i].sum() else None)
                for i, label in enumerate(labels)}


def system_stats(rows: Iterable[dict[str, Any]]) -> dict[str, SystemStats]:
    by_system: dict[str, SystemStats] = defaultdict(SystemStats)
    for row in rows:
        by_system[row["system"]].add(row)
    return dict(by_system)


def system_metrics(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per system: accuracy vs gold, parse rate, error count, tokens and latency."""
    return {system: stats.metrics() for system, stats in sorted(system_stats(rows).items())}


def throughput(rows: Sequence[dict[str, Any]]) -> float | None:
    """Answered requests per second over the window from the first send to the last answer."""
    span = Span()
    for row in rows:
        span.add(row)
    return span.throughput()


def accuracy_by_label(rows: Iterable[dict[str, Any]], system: str, labels: Sequence[str]) -> dict[str, float | None]:
    """Per gold label: the share of that label's queries the system labelled right (recall)."""
    return system_stats(r for r in rows if r["system"] == system).get(system, SystemStats()).accuracy_by_label(labels)


def agreement(rows: Iterable[dict[str, Any]], a: str, b: str) -> float | None:
    """Share of queries answered by both systems on which their parsed labels are equal."""
    agreed, n = agreement_counts(rows, a, b)
    return agreed / n if n else None


def agreement_counts(rows: Iterable[dict[str, Any]], a: str, b: str) -> tuple[int, int]:
    """(queries with equal parsed labels, queries answered by both); unparsed never agrees."""
    return pair_agreed(label_pairs(rows, a, b))


def label_pairs(rows: Iterable[dict[str, Any]], a: str, b: str) -> Counter[tuple[str | None, str | None]]:
    """(label of ``a``, label of ``b``) → queries, over the queries both answered."""
    return Counter((ra["label"], rb["label"]) for ra, rb in paired(rows, a, b))


def pair_agreed(pairs: Counter[tuple[str | None, str | None]]) -> tuple[int, int]:
    """(queries with equal parsed labels, queries) of a ``label_pairs`` count; unparsed never agrees."""
    return sum(n for (la, lb), n in pairs.items() if la is not None and la == lb), sum(pairs.values())


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
    return pair_matrix(label_pairs(rows, a, b), labels)


def pair_matrix(pairs: Counter[tuple[str | None, str | None]], labels: Sequence[str]) -> np.ndarray:
    index: dict[str | None, int] = {label: i for i, label in enumerate(labels)}
    matrix = np.zeros((len(labels) + 1, len(labels) + 1), dtype=np.int64)
    for (la, lb), n in pairs.items():
        matrix[index.get(la, len(labels)), index.get(lb, len(labels))] += n
    return matrix


def agreement_by_label(rows: Iterable[dict[str, Any]], a: str, b: str,
                       labels: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per label of ``a`` (plus ``unparsed``): n, and the share where ``b`` gave the same label.

    Where ``a`` gave no label there is nothing to agree with, so that row has n only.
    """
    return pair_agreement_by_label(label_pairs(rows, a, b), labels)


def pair_agreement_by_label(pairs: Counter[tuple[str | None, str | None]],
                            labels: Sequence[str]) -> dict[str, dict[str, Any]]:
    counts = {label: [0, 0] for label in [*labels, UNPARSED]}
    for (la, lb), n in pairs.items():
        key = la if la in counts and la != UNPARSED else UNPARSED
        counts[key][1] += n
        counts[key][0] += n if key != UNPARSED and lb == la else 0
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
    stats = PairStats(limit=limit, max_chars=max_chars)
    stats.add_pairs(paired(rows, "teacher", "student"))
    return stats.examples()


def disagreement_rank(teacher: dict[str, Any], student: dict[str, Any]) -> int:
    """0: only the teacher is right, 1: only the student is, 2: the rest (``disagreements``' order)."""
    gold = teacher.get("gold")
    if gold is None:
        return 2
    return 0 if teacher["label"] == gold else 1 if student["label"] == gold else 2


class PairStats:
    """Mergeable teacher-vs-student comparison over the queries both answered: the count of each
    (teacher label, student label) pair and the first ``limit`` disagreements in ``disagreements``'
    order. Bounded memory: labels squared, plus ``limit`` examples."""

    def __init__(self, limit: int = 15, max_chars: int = 80):
        self.limit, self.max_chars = limit, max_chars
        self.pairs: Counter[tuple[str | None, str | None]] = Counter()
        self.candidates: list[tuple[int, str, dict[str, Any]]] = []  # (rank, id, example), best first

    def add_pairs(self, pairs: Iterable[tuple[dict[str, Any], dict[str, Any]]]) -> None:
        found = []
        for t, s in pairs:
            self.pairs[(t["label"], s["label"])] += 1
            if t["label"] is None or t["label"] != s["label"]:
                found.append((disagreement_rank(t, s), str(t["id"]), t, s))
        found.sort(key=lambda c: (c[0], c[1]))
        self._keep([(rank, qid, self._example(t, s)) for rank, qid, t, s in found[: self.limit]])

    def merge(self, other: PairStats) -> None:
        self.pairs.update(other.pairs)
        self._keep(other.candidates)

    def examples(self) -> list[dict[str, Any]]:
        return [example for _, _, example in self.candidates]

    def _keep(self, more: list[tuple[int, str, dict[str, Any]]]) -> None:
        self.candidates = sorted(self.candidates + more, key=lambda c: (c[0], c[1]))[: self.limit]

    def _example(self, t: dict[str, Any], s: dict[str, Any]) -> dict[str, Any]:
        return {"id": t["id"], "query": truncate(t.get("query"), self.max_chars), "gold": t.get("gold"),
                "teacher_label": t["label"], "student_label": s["label"],
                "teacher_answer": truncate(t.get("answer"), self.max_chars),
                "student_answer": truncate(s.get("answer"), self.max_chars)}


def truncate(text: str | None, max_chars: int) -> str | None:
    if text is None or len(text) <= max_chars:
        return text
    return text[: max_chars - 1] + "…"


def compare(rows: Sequence[dict[str, Any]], metrics: dict[str, dict[str, Any]],
            labels: Sequence[str]) -> dict[str, Any]:
    """Everything on whether the student can replace the teacher, JSON-ready (the manifest holds it)."""
    stats = PairStats()
    stats.add_pairs(paired(rows, "teacher", "student"))
    return comparison(stats, metrics, labels)


def comparison(stats: PairStats, metrics: dict[str, dict[str, Any]], labels: Sequence[str]) -> dict[str, Any]:
    """``compare`` from a ``PairStats`` (filled from result files of any size)."""
    agreed, n = pair_agreed(stats.pairs)
    return {
        "agreed": agreed, "n": n, "agreement": agreed / n if n else None,
        "agreement_ci95": list(wilson_interval(agreed, n)) if n else None,
        "matrix_labels": [*labels, UNPARSED],
        # rows: the teacher's label, columns: the student's
        "matrix": pair_matrix(stats.pairs, labels).tolist(),
        "by_teacher_label": pair_agreement_by_label(stats.pairs, labels),
        "tokens": token_savings(metrics),
        "disagreements": stats.examples(),
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
    return system_stats(r for r in rows if r["system"] == system).get(system, SystemStats()).confusion(labels)


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None
