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

import pyarrow as pa

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
