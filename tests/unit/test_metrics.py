import numpy as np
import pytest

from raydistill.evaluate.metrics import accuracy_by_label, agreement, confusion, percentile, system_metrics, throughput
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
