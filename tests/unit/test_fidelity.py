"""Free-form fidelity (pure): the prompted teacher's scores and surface metrics → the summary."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from raydistill.evaluate.fidelity import chrf, fidelity_summary, mean_ci, normalize, without_distributions
from raydistill.evaluate.free_report import free_payoff, free_summary_table, write_free_report
from raydistill.tasks.task import load_task
from raydistill.teacher.scoring import SCORES, mean_logprob, read_scores, scored_tokens

REPO = Path(__file__).resolve().parents[2]
SUPPORT = REPO / "examples" / "custom_task" / "support" / "task.yaml"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(REPO / "tests" / "data" / "smollm2-tokenizer")


def test_scored_tokens_are_the_teacher_chat_then_the_answer_and_its_end_of_turn(tokenizer):
    task = load_task(str(SUPPORT))
    ids, start = scored_tokens(tokenizer, task, "How do I resize?", "Thanks for reaching out! Use Settings > Resize.")
    head = tokenizer.decode(ids[:start])
    assert head.startswith("<|im_start|>system\nYou are Nimbus")
    assert head.endswith("How do I resize?<|im_end|>\n<|im_start|>assistant\nThanks for reaching out!")  # the forced prefix
    assert tokenizer.decode(ids[start:]) == " Use Settings > Resize.<|im_end|>"


def test_a_forced_prefix_belongs_to_the_prompt_whether_or_not_the_answer_repeats_it(tokenizer):
    task = load_task(str(REPO / "tests" / "data" / "tiny_task.yaml"))
    with_prefix = scored_tokens(tokenizer, task, "Hallo", "This text is written in German.")
    without = scored_tokens(tokenizer, task, "Hallo", " German.")
    assert with_prefix == without
    ids, start = with_prefix
    assert tokenizer.decode(ids[:start]).endswith("assistant\nThis text is written in")
    assert tokenizer.decode(ids[start:]) == " German.<|im_end|>"


def test_mean_logprob_reads_the_scored_tokens_only():
    ids = [5, 6, 7, 8]
    prompt_logprobs = [None, {6: {"logprob": -9.0}}, {7: {"logprob": -1.0}, 3: {"logprob": -0.1}}, {"8": {"logprob": -3.0}}]
    assert mean_logprob(prompt_logprobs, ids, 2) == (-2.0, 2)
    lp, n = mean_logprob(prompt_logprobs, ids, 4)
    assert n == 0 and math.isnan(lp)


def test_read_scores_keeps_engine_errors_and_over_long_rows_unscored():
    batch = {"id": np.array(["a", "b", "c"], dtype=object), "task": np.array(["t"] * 3, dtype=object),
             "system": np.array(["student"] * 3, dtype=object), "answer_start": np.array([1, 1, 1]),
             "too_long": np.array([False, True, False]),
             "prompt_token_ids": np.array([[1, 2], [1], [1, 2]], dtype=object),
             "prompt_logprobs": np.array([[None, {2: {"logprob": -0.5}}], None, None], dtype=object),
             "__inference_error__": np.array(["", "", "engine died"], dtype=object)}
    table = read_scores(batch)
    assert table.schema == SCORES
    rows = table.to_pylist()
    assert rows[0]["teacher_logprob"] == -0.5 and rows[0]["answer_tokens"] == 1 and rows[0]["error"] is None
    assert rows[1]["teacher_logprob"] is None and "teacher.max_model_len" in rows[1]["error"]
    assert rows[2]["teacher_logprob"] is None and rows[2]["error"] == "engine died"


def test_normalize_and_chrf():
    assert normalize("  Thanks,  for reaching OUT! ") == normalize("thanks for reaching out")
    assert chrf("the same answer", "the same answer") == pytest.approx(100.0)
    assert 0 < chrf("the same answers", "the same answer") < 100
    assert chrf("xyz", "the same answer") < chrf("the same", "the same answer")


def test_mean_ci():
    assert mean_ci([]) == (None, None)
    assert mean_ci([2.0]) == (2.0, None)
    mean, (lo, hi) = mean_ci([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and lo < 2.5 < hi and hi - lo == pytest.approx(2 * 1.96 * np.std([1, 2, 3, 4], ddof=1) / 2)


def _tables(rows):
    answers = pa.Table.from_pylist([{"id": i, "system": s, "query": f"q{i}", "answer": a, "num_output_tokens": n}
                                    for i, s, a, n, _ in rows])
    scores = pa.Table.from_pylist([{"id": i, "system": s, "teacher_logprob": lp} for i, s, _, _, lp in rows])
    return answers, scores


def test_fidelity_summary_compares_each_system_to_the_teacher_per_query():
    answers, scores = _tables([
        ("1", "teacher", "Thanks! Resize it.", 4, -0.5), ("1", "student", "Thanks! Resize it.", 4, -0.5),
        ("1", "base", "I don't know", 3, -3.0),
        ("2", "teacher", "Thanks! Invoices are monthly.", 5, -0.4), ("2", "student", "thanks, invoices are monthly", 5, -0.9),
        ("2", "base", "Hello", 1, -4.0),
        ("3", "teacher", "Thanks! Rotate the key.", 5, -0.6), ("3", "student", "Thanks! Rotate it.", 4, -0.4),
        ("3", "base", "ok", 1, None),  # not scored: out of the base's comparison, still in its answers
    ])
    out = fidelity_summary(answers, scores)
    student, base = out["student"], out["base"]
    assert student["n"] == 3 and student["scored"] == 3
    assert student["teacher_logprob_gap"] == pytest.approx((0.0 + 0.5 - 0.2) / 3)
    assert student["at_least_teacher"] == pytest.approx(2 / 3)  # equal counts as at least as likely
    assert student["exact_match"] == pytest.approx(1 / 3) and student["normalized_match"] == pytest.approx(2 / 3)
    assert student["length_ratio"] == pytest.approx(13 / 14)
    assert student["largest_gaps"][0]["id"] == "2"
    assert base["scored"] == 2 and base["teacher_logprob_gap"] == pytest.approx((2.5 + 3.6) / 2)
    assert out["unscored"] == 1
    means = {s: v["teacher_logprob"] for s, v in out["systems"].items()}
    assert out["fidelity_student_over_base"] == pytest.approx(math.exp(means["student"] - means["base"]))
    assert out["fidelity_student_over_base"] > 1
    kept = without_distributions(out)
    assert "gaps" not in kept["student"] and "gaps" in out["student"]


def test_the_free_report_and_table(tmp_path):
    answers, scores = _tables([("1", "teacher", "a b", 2, -0.5), ("1", "student", "a c", 2, -1.0),
                               ("2", "teacher", "d", 1, -0.2), ("2", "student", "d", 1, -0.2)])
    fidelity = fidelity_summary(answers, scores)
    metrics = {s: {"accuracy": None, "parse_rate": 1.0, "mean_input_tokens": t, "latency_p50_s": 0.1,
                   "latency_p95_s": 0.2, "latency_p99_s": 0.3, "throughput_rps": r, "errors": 0}
               for s, t, r in (("teacher", 400.0, 2.0), ("student", 20.0, 4.0))}
    comparison = {"tokens": {"teacher_over_student": 20.0}}
    payoff = free_payoff(metrics, comparison, fidelity)
    assert payoff["input_tokens_teacher_over_student"] == 20.0 and payoff["rps_student_over_teacher"] == 2.0
    assert payoff["teacher_logprob_gap"] == pytest.approx(0.25)
    table = free_summary_table(metrics, fidelity, payoff)
    assert "0.250 nats/token" in table and "20.0x fewer" in table
    write_free_report(tmp_path, metrics, fidelity, payoff, {"teacher": [0.1], "student": [0.2]}, {"generate": 1.0})
    md = (tmp_path / "report.md").read_text()
    assert "Largest gaps" in md and "a c" in md and (tmp_path / "fidelity.png").stat().st_size > 1000
    assert "data:image/png;base64," in (tmp_path / "report.html").read_text()
