"""Self-consistent labels (pure): k teacher answers per query vote, the majority is the target.

A small teacher changes a share of its labels when only the sampling seed (or the order of its
demonstrations) changes; training on one draw teaches the student that noise. With
``teacher.votes = k`` generate samples k answers per query, and training keeps one row per query:
the majority label (ties go to the label of the lowest sample index among the tied ones, so reruns
agree), carried by the earliest sample that gave it, with ``confidence`` = the majority's share of
all k votes (unparsed answers count as votes for nothing). ``train.min_confidence`` drops the rows
below it.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

CONFIDENCE = "confidence"


def majority_vote(group: pa.Table) -> pa.Table:
    """The samples of one query → one row: the majority's earliest sample, with ``confidence``."""
    order = sorted(range(group.num_rows), key=lambda i: group["sample_index"][i].as_py())
    labels = group["label"].to_pylist()
    valid = group["valid"].to_pylist()
    votes = Counter(labels[i] for i in order if valid[i] and labels[i] is not None)
    if not votes:  # nothing parsed: the first sample, invalid, so training drops it
        pick, share = order[0], 0.0
    else:
        top = max(votes.values())
        pick = next(i for i in order if valid[i] and votes.get(labels[i]) == top)
        share = top / group.num_rows
    row = group.slice(pick, 1)
    return row.append_column(CONFIDENCE, pa.array([share], type=pa.float32()))


def vote_counts(block: pa.Table, min_confidence: float) -> pa.Table:
    """One block of voted rows → one row of counts; ``summarize_votes`` adds the blocks' rows up.
    A plain map over the voted blocks: one pass of tasks, where Ray Data's ``mean`` and two
    ``filter().count()`` were three executions (the first a shuffle with its own actors)."""
    confidence = pc.fill_null(block[CONFIDENCE], 0.0)
    kept = pc.and_(pc.greater_equal(confidence, min_confidence), pc.fill_null(block["valid"], False))
    return pa.table({
        "queries": [block.num_rows],
        "confidence_sum": [pc.sum(confidence).as_py() or 0.0],
        "unanimous": [pc.sum(pc.greater_equal(confidence, 1.0).cast(pa.int64())).as_py() or 0],
        "kept": [pc.sum(kept.cast(pa.int64())).as_py() or 0],
    })


def summarize_votes(rows: list[dict[str, Any]], votes: int, min_confidence: float) -> dict[str, Any]:
    """The blocks' counts → how the votes went, for the log and the student's manifest."""
    queries = sum(r["queries"] for r in rows)
    return {"queries": queries,
            "mean_confidence": round(sum(r["confidence_sum"] for r in rows) / queries, 4) if queries else 0.0,
            "unanimous": sum(r["unanimous"] for r in rows), "kept": sum(r["kept"] for r in rows),
            "votes_per_query": votes, "min_confidence": min_confidence}
