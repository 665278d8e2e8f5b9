"""Majority votes over k teacher samples of one query (pure)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from raydistill.student.votes import CONFIDENCE, majority_vote, summarize_votes, vote_counts


def group(*votes: tuple[int, str | None, bool]) -> pa.Table:
    return pa.Table.from_pylist([{"id": "q", "sample_index": k, "label": label, "valid": valid,
                                  "response": f"answer {k}"} for k, label, valid in votes])


def test_the_majority_wins_and_its_earliest_sample_carries_it():
    row = majority_vote(group((2, "de", True), (0, "en", True), (1, "de", True), (3, "de", True), (4, None, False)))
    assert row.num_rows == 1
    assert row["label"][0].as_py() == "de" and row["sample_index"][0].as_py() == 1
    assert row[CONFIDENCE][0].as_py() == pytest.approx(3 / 5)  # the unparsed answer is a vote for nothing


def test_a_tie_goes_to_the_label_of_the_lowest_sample_index():
    row = majority_vote(group((1, "fr", True), (2, "es", True), (0, "es", True), (3, "fr", True)))
    assert row["label"][0].as_py() == "es" and row["sample_index"][0].as_py() == 0
    assert row[CONFIDENCE][0].as_py() == pytest.approx(0.5)


def test_nothing_parsed_gives_an_invalid_row_with_no_confidence():
    row = majority_vote(group((0, None, False), (1, None, False)))
    assert row["valid"][0].as_py() is False and row[CONFIDENCE][0].as_py() == 0.0


def test_one_vote_is_unanimous():
    row = majority_vote(group((0, "en", True)))
    assert row["label"][0].as_py() == "en" and row[CONFIDENCE][0].as_py() == 1.0


def test_block_counts_add_up_to_the_votes_summary():
    """Voted rows split over two blocks (as Ray Data hands them out): the summary is the same as
    over one table, and a query is kept only if its majority is wide enough and it parsed."""
    rows = [{CONFIDENCE: 1.0, "valid": True}, {CONFIDENCE: 2 / 3, "valid": True},
            {CONFIDENCE: 1 / 3, "valid": True}, {CONFIDENCE: 0.0, "valid": False}]
    table = pa.Table.from_pylist(rows, schema=pa.schema([(CONFIDENCE, pa.float32()), ("valid", pa.bool_())]))
    whole = summarize_votes(vote_counts(table, 0.6).to_pylist(), 3, 0.6)
    split = summarize_votes([*vote_counts(table.slice(0, 1), 0.6).to_pylist(),
                             *vote_counts(table.slice(1), 0.6).to_pylist()], 3, 0.6)
    assert whole == split == {"queries": 4, "mean_confidence": pytest.approx((1 + 2 / 3 + 1 / 3) / 4, abs=1e-4),
                              "unanimous": 1, "kept": 2, "votes_per_query": 3, "min_confidence": 0.6}
    assert summarize_votes(vote_counts(table, 0.0).to_pylist(), 3, 0.0)["kept"] == 3  # the unparsed one never
    assert summarize_votes([], 3, 0.6)["mean_confidence"] == 0.0
