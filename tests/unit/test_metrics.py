import json

import numpy as np
import pytest

from raydistill.evaluate.metrics import (
    accuracy_by_label,
    agreement,
    agreement_by_label,
    agreement_counts,
    agreement_matrix,
    compare,
    confusion,
    disagreements,
    payoff,
    percentile,
    system_metrics,
    throughput,
    wilson_interval,
)
from raydistill.evaluate.report import summary_table, write_report


def row(qid, system, gold, label, latency=0.1, tokens=10, error=None, start=None):
    return {"id": qid, "system": system, "gold": gold, "label": label, "valid": label is not None,
            "latency_s": latency, "num_input_tokens": tokens, "num_output_tokens": 2, "error": error,
            "started_at": 1000.0 + int(qid) if start is None else start}


ROWS = [
    row("1", "teacher", "en", "en", 0.2, 300), row("1", "student", "en", "en", 0.1, 30),
    row("2", "teacher", "fr", "de", 0.4, 300), row("2", "student", "fr", "de", 0.1, 30),
    row("3", "teacher", "de", "de", 0.6, 300), row("3", "student", "de", None, 0.3, 30),
    row("4", "teacher", "en", None, None, None, error="HTTP 500"),
]


def test_system_metrics():
    m = system_metrics(ROWS)
    assert m["teacher"]["accuracy"] == pytest.approx(2 / 4)
    assert m["teacher"]["errors"] == 1
    assert m["teacher"]["mean_input_tokens"] == 300
    assert m["teacher"]["latency_p50_s"] == pytest.approx(0.4)
    assert m["student"]["accuracy"] == pytest.approx(1 / 3)
    assert m["student"]["parse_rate"] == pytest.approx(2 / 3)


def test_agreement_counts_unparsed_as_disagreement():
    assert agreement(ROWS, "student", "teacher") == pytest.approx(2 / 3)
    assert agreement(ROWS, "student", "nobody") is None


def test_confusion_matrix():
    m = confusion(ROWS, "student", ["de", "en", "fr"])
    expected = np.array([[0, 0, 0, 1], [0, 1, 0, 0], [1, 0, 0, 0]])
    assert (m == expected).all()


def test_summary_table_lists_systems():
    text = summary_table(system_metrics(ROWS), 0.5)
    assert "teacher (with prompt) | 50.0%" in text and "50.0%" in text.splitlines()[-1]


def test_latency_percentiles_and_throughput():
    rows = [row(str(i), "student", "en", "en", latency=float(i), start=100.0) for i in range(1, 101)]
    m = system_metrics(rows)["student"]
    assert m["latency_p95_s"] == pytest.approx(percentile(list(range(1, 101)), 95)) == pytest.approx(95.05)
    assert m["throughput_rps"] == pytest.approx(100 / 100.0)  # all sent at t=100, last answer at t=200
    # student rows start at 1001, 1002, 1003 with latencies .1, .1, .3: window 1001 -> 1003.3
    assert throughput([r for r in ROWS if r["system"] == "student"]) == pytest.approx(3 / 2.3)
    assert throughput([]) is None


def test_accuracy_by_label_is_per_gold_recall():
    acc = accuracy_by_label(ROWS, "teacher", ["de", "en", "fr", "zh"])
    assert acc == {"de": 1.0, "en": 0.5, "fr": 0.0, "zh": None}  # the errored en row counts as wrong


def test_report_files_are_self_contained(tmp_path):
    labels = ["de", "en", "fr"]
    metrics = system_metrics(ROWS)
    systems = ["teacher", "student"]
    write_report(tmp_path, metrics, 0.5, {s: confusion(ROWS, s, labels) for s in systems}, labels, {"generate": 3.0},
                 {s: accuracy_by_label(ROWS, s, labels) for s in systems},
                 {s: [r["latency_s"] for r in ROWS if r["system"] == s and r["latency_s"]] for s in systems})
    for name in ("report.md", "report.html", "confusion.png", "accuracy_by_label.png", "latency.png"):
        assert (tmp_path / name).stat().st_size > 0
    page = (tmp_path / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 3
    assert "http://" not in page and "https://" not in page  # nothing to fetch: opens offline
    assert "student (no prompt)" in page and "50.0%" in page


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(8, 10)
    assert (lo, hi) == (pytest.approx(0.4902, abs=1e-4), pytest.approx(0.9433, abs=1e-4))
    assert wilson_interval(0, 10) == (0.0, pytest.approx(0.2775, abs=1e-4))  # not the Wald interval's (0, 0)
    assert wilson_interval(10, 10) == (pytest.approx(0.7225, abs=1e-4), 1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)  # no data: nothing is ruled out
    lo, hi = wilson_interval(297, 325)  # narrows with n and stays around the point estimate
    assert lo < 297 / 325 < hi and hi - lo < 0.07


def test_system_metrics_accuracy_interval():
    m = system_metrics(ROWS)["teacher"]
    assert m["scored"] == 4 and m["accuracy_ci95"] == list(wilson_interval(2, 4))


def pair(qid, gold, teacher, student, query=None, t_error=None):
    """Teacher and student rows of one query: hand-made, with token counts and send times that
    give the teacher 1412 input tokens and 7/9 requests/s, the student 92 and 2 requests/s."""
    query = query or f"query {qid}"
    return [
        {**row(qid, "teacher", gold, None if t_error else teacher, 2.0, 1412, t_error, 100.0 + int(qid)),
         "query": query, "answer": None if t_error else f"It is {teacher}"},
        {**row(qid, "student", gold, student, 0.5, 92, None, 200.0 + 0.5 * int(qid)),
         "query": query, "answer": f"It is {student}"},
    ]


LABELS = ["de", "en", "fr"]
LONG = "first line | with a pipe\nsecond line " + "x" * 100
PAIRS = [
    *pair("1", "en", "en", "en"),
    *pair("2", "fr", "fr", "de"),            # teacher right, student wrong
    *pair("3", "de", "en", "de"),            # student right
    *pair("4", "en", None, "en"),            # teacher unparsed, student right
    *pair("5", "fr", "de", "de"),            # agree, both wrong
    *pair("6", "de", None, None),            # both unparsed: not an agreement
    *pair("7", "en", "en", "en", t_error="HTTP 500"),  # teacher failed: left out of every pairing
    *pair("8", "en", "en", "fr", query=LONG),  # teacher right
]


def test_agreement_matrix_counts_queries_both_answered():
    assert agreement_counts(PAIRS, "student", "teacher") == (2, 7)
    m = agreement_matrix(PAIRS, "teacher", "student", LABELS)
    expected = np.array([[1, 0, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0], [0, 1, 0, 1]])  # rows teacher, cols student
    assert (m == expected).all()
    assert np.trace(m[:-1, :-1]) == 2 and m.sum() == 7


def test_agreement_by_teacher_label():
    by = agreement_by_label(PAIRS, "teacher", "student", LABELS)
    assert {k: (v["n"], v["agreement"]) for k, v in by.items()} == {
        "de": (1, 1.0), "en": (3, pytest.approx(1 / 3)), "fr": (1, 0.0), "unparsed": (2, None)}
    assert by["en"]["ci95"] == list(wilson_interval(1, 3)) and by["unparsed"]["ci95"] is None


def test_disagreements_teacher_right_first_truncated():
    examples = disagreements(PAIRS)
    assert [e["id"] for e in examples] == ["2", "8", "3", "4", "6"]
    long = examples[1]
    assert len(long["query"]) == 80 and long["query"].endswith("…") and long["query"].startswith("first line |")
    assert (long["gold"], long["teacher_answer"], long["student_label"]) == ("en", "It is en", "fr")
    assert disagreements(PAIRS, limit=2) == examples[:2]


def test_payoff_keys_and_values():
    metrics = system_metrics(PAIRS)
    comparison = compare(PAIRS, metrics, LABELS)
    gains = payoff(metrics, comparison)
    assert list(gains) == ["input_tokens_teacher_over_student", "accuracy_student_over_teacher", "agreement",
                           "agreement_ci95", "teacher_parse_rate", "rps_student_over_teacher"]
    assert gains["input_tokens_teacher_over_student"] == pytest.approx(1412 / 92)
    assert gains["accuracy_student_over_teacher"] == pytest.approx((4 / 8) / (3 / 8))  # errored request is wrong
    assert gains["agreement"] == pytest.approx(2 / 7)
    assert gains["agreement_ci95"] == list(wilson_interval(2, 7))
    assert gains["teacher_parse_rate"] == pytest.approx(5 / 8)
    assert gains["rps_student_over_teacher"] == pytest.approx(2.0 / (7 / 9))  # each over its own window
    tokens = comparison["tokens"]
    assert tokens["saved_per_request"] == 1320 and tokens["saved_per_million_requests"] == pytest.approx(1.32e9)
    assert json.loads(json.dumps(comparison)) == comparison  # goes into _manifest.json as is


def test_payoff_without_a_student_is_empty_not_an_error():
    metrics = system_metrics([r for r in PAIRS if r["system"] == "teacher"])
    gains = payoff(metrics, compare(PAIRS[::2], metrics, LABELS))
    assert gains["agreement"] is None and gains["input_tokens_teacher_over_student"] is None
    assert gains["teacher_parse_rate"] == pytest.approx(5 / 8)


def _payoff_inputs():
    metrics = system_metrics(PAIRS)
    comparison = compare(PAIRS, metrics, LABELS)
    return metrics, comparison, payoff(metrics, comparison)


def test_summary_table_prints_the_payoff():
    metrics, comparison, gains = _payoff_inputs()
    text = summary_table(metrics, comparison["agreement"], comparison, gains)
    lines = text.splitlines()
    assert lines[2].startswith("| teacher (with prompt) | 37.5% |")  # the per-system table is still first
    assert "Can the student replace the teacher?" in lines
    assert "- Student–teacher agreement (same parsed label): 28.6% [8.2, 64.1] (95% Wilson, n=7)" in lines
    assert "- input tokens per request: teacher 1,412 vs student 92.0 = 15.3x fewer; 1.32 B tokens saved per million requests" in lines
    assert "- accuracy: teacher 37.5% [13.7, 69.4] vs student 50.0% [21.5, 78.5] (95% Wilson, n=8 each); student/teacher = 1.33x" in lines
    assert "- requests/s, each system in its own pass: teacher 0.78 vs student 2.00; student/teacher = 2.57x" in lines
    assert any(line.startswith("- teacher parse rate: 62.5%") for line in lines)
    # without the comparison (or without a student) only the agreement line follows the table
    assert summary_table(metrics, 0.25).splitlines()[-1] == "Student–teacher agreement (same parsed label): 25.0%"


def test_report_answers_whether_the_student_can_replace_the_teacher(tmp_path):
    metrics, comparison, gains = _payoff_inputs()
    systems = ["teacher", "student"]
    write_report(tmp_path, metrics, comparison["agreement"], {s: confusion(PAIRS, s, LABELS) for s in systems},
                 LABELS, None, {s: accuracy_by_label(PAIRS, s, LABELS) for s in systems},
                 {s: [r["latency_s"] for r in PAIRS if r["system"] == s] for s in systems}, comparison, gains)
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    for heading in ("## Payoff", "## Accuracy and agreement (95% Wilson score intervals)", "## Agreement matrix",
                    "## Agreement per teacher label", "## Token savings", "## Disagreements (showing 5 of 5;",
                    "## Plots", "## Confusion matrices"):
        assert heading in md, heading
    assert "| agreement_ci95 | [8.2, 64.1] |" in md and "| input_tokens_teacher_over_student | 15.3x |" in md
    assert "| en | 1 | 1 | 1 | 0 |" in md and "| unparsed | 0 | 1 | 0 | 1 |" in md  # the matrix, teacher rows
    assert "| en | 3 | 33.3% | [6.1, 79.2] |" in md and "| saved per million requests | 1.32 B |" in md
    example = next(line for line in md.splitlines() if line.startswith("| first line"))
    # the query's pipe and newline are escaped, so the example stays one row of four cells
    assert example.startswith(r"| first line \| with a pipe ⏎ second line")
    assert example.replace(r"\|", "").count("|") == 5
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "Can the student replace the teacher?" in page and "Agreement per teacher label" in page
    assert page.count('src="data:image/png;base64,') == 3
