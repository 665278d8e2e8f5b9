"""Fidelity of free-form answers: how close the student (and the base model) answer to the teacher.

A free task has no labels to agree on, so the student is judged two ways, per query:
  - by the teacher *with its prompt* (``teacher/scoring.py``): the mean log-prob per token of the
    student's answer against that of the teacher's own answer to the same query. The gap (nats
    per token, teacher's minus student's) is 0 for a student that answers as likely as the teacher
    does; the share of queries where the student's answer is at least as likely is a second view;
  - on the surface (sacrebleu's chrF, exact and normalized match, length ratio), against the
    teacher's answer text.
``fidelity_summary`` is pure (arrays in, JSON-ready dict out); ``answers_table`` and
``score_results`` are the I/O around it.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raydistill.evaluate.metrics import truncate, wilson_interval

FIDELITY_SYSTEMS = ("teacher", "student", "base")
ANSWER_COLUMNS = ["id", "task", "system", "query", "answer", "num_output_tokens", "error"]
EXAMPLES = 10  # largest gaps shown side by side in the report
EXAMPLE_CHARS = 300


def normalize(text: str | None) -> str:
    """Casefold, NFKC, punctuation dropped, whitespace collapsed: what 'the same answer' ignores."""
    text = unicodedata.normalize("NFKC", text or "").casefold()
    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text)
    return re.sub(r"\s+", " ", text).strip()


def chrf(hypothesis: str, reference: str) -> float:
    """Sentence-level chrF (0-100) of ``hypothesis`` against ``reference`` (sacrebleu)."""
    from sacrebleu.metrics import CHRF

    return float(CHRF().sentence_score(hypothesis or "", [reference or ""]).score)


def mean_ci(values: Sequence[float]) -> tuple[float | None, list[float] | None]:
    """Mean and its 95% normal interval (the per-query values are many and bounded)."""
    x = np.asarray(values, dtype=float)
    if not len(x):
        return None, None
    mean = float(x.mean())
    if len(x) < 2:
        return mean, None
    half = 1.96 * float(x.std(ddof=1)) / math.sqrt(len(x))
    return mean, [mean - half, mean + half]


def answers_table(files: list[str]) -> pa.Table:
    """The answered rows of the systems fidelity compares (small columns plus the texts)."""
    tables = [pq.read_table(f, columns=ANSWER_COLUMNS) for f in files]
    table = pa.concat_tables(tables) if tables else pa.table({c: [] for c in ANSWER_COLUMNS})
    keep = pc.and_(pc.is_in(table["system"], pa.array(FIDELITY_SYSTEMS)), pc.is_null(table["error"]))
    return table.filter(keep)


def fidelity_summary(answers: pa.Table, scores: pa.Table) -> dict[str, Any]:
    """Per-query scores and answers of one task → the fidelity section of the summary (pure).

    ``answers``: id, system, query, answer, num_output_tokens; ``scores``: id, system,
    teacher_logprob (``teacher/scoring.SCORES``). Queries missing a system's score are left out
    of that system's comparison with the teacher."""
    by: dict[str, dict[str, dict[str, Any]]] = {s: {} for s in FIDELITY_SYSTEMS}  # system -> id -> row
    for row in answers.to_pylist():
        by[row["system"]][row["id"]] = dict(row)
    unscored = 0
    for row in scores.to_pylist():
        target = by.get(row["system"], {}).get(row["id"])
        if target is not None:
            target["lp"] = row["teacher_logprob"]
            unscored += row["teacher_logprob"] is None
    systems: dict[str, Any] = {}
    for system, rows in by.items():
        lps = [r["lp"] for r in rows.values() if r.get("lp") is not None]
        if rows:
            mean, ci = mean_ci(lps)
            systems[system] = {"n": len(lps), "teacher_logprob": mean, "teacher_logprob_ci95": ci,
                               "per_token_prob": math.exp(mean) if mean is not None else None,
                               "mean_output_tokens": _mean([r["num_output_tokens"] for r in rows.values()])}
    out: dict[str, Any] = {"systems": systems, "unscored": unscored}
    for system in ("student", "base"):
        if by[system] and by["teacher"]:
            out[system] = compare_to_teacher(by["teacher"], by[system])
    student, base = systems.get("student", {}).get("teacher_logprob"), systems.get("base", {}).get("teacher_logprob")
    # the per-token probability the prompted teacher gives the student's answers over the base model's
    out["fidelity_student_over_base"] = math.exp(student - base) if student is not None and base is not None else None
    return out


def compare_to_teacher(teacher: dict[str, dict[str, Any]], other: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One system's answers against the teacher's, over the queries both answered."""
    ids = sorted(set(teacher) & set(other))
    scored = [i for i in ids if teacher[i].get("lp") is not None and other[i].get("lp") is not None]
    gaps = [teacher[i]["lp"] - other[i]["lp"] for i in scored]
    at_least = sum(g <= 1e-9 for g in gaps)
    gap, gap_ci = mean_ci(gaps)
    chrfs = [chrf(other[i]["answer"], teacher[i]["answer"]) for i in ids]
    exact = sum((other[i]["answer"] or "").strip() == (teacher[i]["answer"] or "").strip() for i in ids)
    normalized = sum(normalize(other[i]["answer"]) == normalize(teacher[i]["answer"]) for i in ids)
    t_len = _mean([teacher[i]["num_output_tokens"] for i in ids])
    o_len = _mean([other[i]["num_output_tokens"] for i in ids])
    worst = sorted(scored, key=lambda i: teacher[i]["lp"] - other[i]["lp"], reverse=True)[:EXAMPLES]
    return {
        "n": len(ids), "scored": len(scored),
        "teacher_logprob_gap": gap, "teacher_logprob_gap_ci95": gap_ci,
        "at_least_teacher": at_least / len(scored) if scored else None,
        "at_least_teacher_ci95": list(wilson_interval(at_least, len(scored))) if scored else None,
        "chrf": _mean(chrfs), "exact_match": exact / len(ids) if ids else None,
        "normalized_match": normalized / len(ids) if ids else None,
        "length_ratio": o_len / t_len if o_len is not None and t_len else None,
        "gaps": [round(g, 4) for g in gaps], "chrfs": [round(c, 2) for c in chrfs],
        "largest_gaps": [{"id": i, "query": truncate(teacher[i]["query"], EXAMPLE_CHARS),
                          "teacher_answer": truncate(teacher[i]["answer"], EXAMPLE_CHARS),
                          "answer": truncate(other[i]["answer"], EXAMPLE_CHARS),
                          "teacher_logprob": teacher[i]["lp"], "logprob": other[i]["lp"]} for i in worst],
    }


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [float(v) for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def without_distributions(fidelity: dict[str, Any]) -> dict[str, Any]:
    """The summary as the manifest keeps it: the per-query lists (plots only) dropped."""
    out = dict(fidelity)
    for system in ("student", "base"):
        if system in out:
            out[system] = {k: v for k, v in out[system].items() if k not in ("gaps", "chrfs")}
    return out
