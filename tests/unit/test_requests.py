"""Teacher request rendering and output parsing (pure functions on rows)."""

import numpy as np
import pyarrow as pa
import pytest

from raydistill.config import TeacherConfig
from raydistill.schema import SAMPLES
from raydistill.tasks.task import REJECT_ENGINE, REJECT_NO_LABEL, load_task
from raydistill.teacher.generate import summarize
from raydistill.teacher.requests import (
    build_requests,
    flatten_logprobs,
    parse_outputs,
    sample_hash,
    sample_key,
    sampling_params,
)


@pytest.fixture(scope="module")
def task():
    return load_task("langid")


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer):
    return smollm2_tokenizer


def test_k_samples_per_query_with_distinct_seeds(task, tokenizer):
    batch = {"id": np.array(["a", "b"]), "task": np.array(["langid"] * 2), "text": np.array(["Hola", "Hallo"]), "gold": np.array(["es", None])}
    out = build_requests(batch, tokenizer, {"langid": task}, TeacherConfig(samples_per_query=3, temperature=0.8))
    assert out["id"] == ["a"] * 3 + ["b"] * 3
    assert out["sample_index"] == [0, 1, 2] * 2
    assert len({p["seed"] for p in out["sampling_params"][:3]}) == 3
    prompt = out["prompt"][0]
    assert task.system_prompt in prompt and "Hola" in prompt and prompt.endswith(task.assistant_prefix)
    greedy = build_requests(batch, tokenizer, {"langid": task}, TeacherConfig())
    assert "seed" not in greedy["sampling_params"][0] and len(greedy["id"]) == 2


def test_parse_outputs_accounts_rejects(task):
    batch = {
        "id": np.array(["1", "2", "3"]), "task": np.array(["langid"] * 3), "query": np.array(["q1", "q2", "q3"]), "gold": np.array(["es", "fr", None]),
        "sample_index": np.array([0, 0, 0]), "generated_text": np.array([" Spanish.", " something", ""]),
        "num_input_tokens": np.array([50, 51, 0]), "num_generated_tokens": np.array([3, 2, 0]),
        "__inference_error__": np.array(["", "", "engine died"]),
    }
    table = parse_outputs(batch, tasks={"langid": task}, teacher_model="m")
    assert table.schema == SAMPLES
    rows = table.to_pylist()
    assert [r["label"] for r in rows] == ["es", None, None]
    assert [r["reject_reason"] for r in rows] == [None, REJECT_NO_LABEL, REJECT_ENGINE]
    assert rows[2]["response"] is None and rows[2]["num_input_tokens"] is None
    assert {r["prompt_sha256"] for r in rows} == {task.prompt_sha256}
    summary = summarize(table)
    assert summary["valid"] == 1 and summary["rejects"] == {REJECT_ENGINE: 1, REJECT_NO_LABEL: 1}
    assert summary["input_tokens"] == 101 and summary["labels"] == {"es": 1}


def test_summarize_empty():
    assert summarize(pa.table({n: pa.array([], type=SAMPLES.field(n).type) for n in SAMPLES.names}))["rows"] == 0


def test_flatten_logprobs_to_plain_lists():
    # vLLM: top-2 alternatives per position plus the sampled token when it ranks lower
    logprobs = [
        {5: {"logprob": -0.1, "rank": 1}, 7: {"logprob": -2.5, "rank": 2}},
        {9: {"logprob": -0.3, "rank": 1}, 4: {"logprob": -1.9, "rank": 2}, 11: {"logprob": -4.0, "rank": 6}},
    ]
    ids, own, top_ids, top_lps = flatten_logprobs([5, 11], logprobs, top_k=2)
    assert ids == [5, 11] and own == pytest.approx([-0.1, -4.0])
    assert top_ids == [[5, 7], [9, 4]] and top_lps[1] == pytest.approx([-0.3, -1.9])


def test_parse_outputs_writes_logprob_columns(task):
    batch = {
        "id": np.array(["1"]), "task": np.array(["langid"]), "query": np.array(["q"]), "gold": np.array([None]), "sample_index": np.array([0]),
        "generated_text": np.array([" Spanish"]), "generated_tokens": np.array([[3, 4]], dtype=object),
        "logprobs": np.array([[{3: {"logprob": -0.5, "rank": 1}}, {4: {"logprob": -0.25, "rank": 1}}]], dtype=object),
        "num_input_tokens": np.array([9]), "num_generated_tokens": np.array([2]),
    }
    table = parse_outputs(batch, tasks={"langid": task}, teacher_model="m", top_k=1)
    row = table.to_pylist()[0]
    assert row["token_ids"] == [3, 4] and row["token_logprobs"] == [-0.5, -0.25]
    assert row["top_token_ids"] == [[3], [4]] and table.schema.field("top_logprobs").type == pa.list_(pa.list_(pa.float32()))


def test_resume_skips_written_samples(task, tokenizer):
    batch = {"id": np.array(["a", "b"]), "task": np.array(["langid"] * 2), "text": np.array(["Hola", "Hallo"]), "gold": np.array([None, None])}
    done = np.unique(np.array([sample_hash(sample_key(i, k)) for i, k in [("a", 0), ("a", 1), ("b", 1)]], dtype=np.uint64))
    out = build_requests(batch, tokenizer, {"langid": task}, TeacherConfig(samples_per_query=2, temperature=0.7), done=done)
    assert list(zip(out["id"], out["sample_index"])) == [("b", 0)]


def test_sampling_params_stop_and_logprobs():
    params = sampling_params(TeacherConfig(stop=["\n"], logprobs=5), 0)
    assert params["stop"] == ["\n"] and params["logprobs"] == 5


def test_parse_outputs_without_logprobs_leaves_columns_null(task):
    batch = {
        "id": np.array(["1"]), "task": np.array(["langid"]), "query": np.array(["q"]), "gold": np.array([None]), "sample_index": np.array([0]),
        "generated_text": np.array([" Spanish"]), "generated_tokens": np.array([[3, 4]], dtype=object),
        "logprobs": np.array([np.float32("nan")], dtype=object),  # what Ray hands over when none were asked for
        "num_input_tokens": np.array([9]), "num_generated_tokens": np.array([2]),
    }
    row = parse_outputs(batch, tasks={"langid": task}, teacher_model="m", top_k=0).to_pylist()[0]
    assert row["token_ids"] is None and row["top_logprobs"] is None and row["label"] == "es"


def test_each_row_gets_its_own_tasks_prompt_and_parser(task, tokenizer):
    rules = load_task("langid-rules")
    tasks = {"a": task, "b": rules}
    batch = {"id": np.array(["a/1", "b/1"]), "task": np.array(["a", "b"]), "text": np.array(["Hola", "Hola"]),
             "gold": np.array([None, None])}
    out = build_requests(batch, tokenizer, tasks, TeacherConfig())
    assert out["task"] == ["a", "b"]
    assert task.system_prompt in out["prompt"][0] and rules.system_prompt in out["prompt"][1]
    assert rules.system_prompt not in out["prompt"][0]
    engine_out = {"id": np.array(out["id"]), "task": np.array(out["task"]), "query": np.array(out["query"]),
                  "gold": np.array([None, None]), "sample_index": np.array([0, 0]),
                  "generated_text": np.array([" Spanish.", " Spanish."]), "num_input_tokens": np.array([1, 1]),
                  "num_generated_tokens": np.array([1, 1])}
    rows = parse_outputs(engine_out, tasks=tasks, teacher_model="m").to_pylist()
    assert [r["task"] for r in rows] == ["a", "b"]
    assert [r["prompt_sha256"] for r in rows] == [task.prompt_sha256, rules.prompt_sha256]
