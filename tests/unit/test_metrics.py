import numpy as np
import pytest

from raydistill.evaluate.metrics import agreement, confusion, system_metrics
from raydistill.evaluate.report import summary_table


def row(qid, system, gold, label, latency=0.1, tokens=10, error=None):
    return {"id": qid, "system": system, "gold": gold, "label": label, "valid": label is not None,
            "latency_s": latency, "num_input_tokens": tokens, "num_output_tokens": 2, "error": error}


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
