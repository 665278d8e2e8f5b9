"""Column contracts: every Ray Data UDF names the columns it reads, and a batch without one fails
with an error naming it (not a KeyError inside a worker); training reads only its own columns."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydistill.errors import DataError
from raydistill.evaluate.client import QUERY_COLUMNS, TRAFFIC_COLUMNS, ChatClient, expand_systems
from raydistill.student.examples import EXAMPLE_COLUMNS, SOFT_COLUMNS, build_examples_batch, example_columns
from raydistill.student.train import check_samples, training_columns
from raydistill.teacher.requests import OUTPUT_COLUMNS, REQUEST_COLUMNS, build_requests, parse_outputs


def batch_without(columns: tuple[str, ...], missing: str) -> dict[str, np.ndarray]:
    return {c: np.array(["x"], dtype=object) for c in columns if c != missing}


def client() -> ChatClient:
    return ChatClient("http://127.0.0.1:1", tasks={}, tagged=False, max_tokens=4, concurrency=1, timeout_s=1)


UDFS = {
    "the teacher's request builder": (REQUEST_COLUMNS, lambda b: build_requests(b, None, {}, None)),
    "the teacher's output parser": (OUTPUT_COLUMNS, lambda b: parse_outputs(b, tasks={}, teacher_model="t")),
    "the training example builder": (EXAMPLE_COLUMNS, lambda b: build_examples_batch(b, tokenizer=None, tasks={},
                                                                                      target="response", max_seq_len=8)),
    "evaluate's traffic builder": (QUERY_COLUMNS, lambda b: expand_systems(b, ["student"])),
    "evaluate's chat client": (TRAFFIC_COLUMNS, lambda b: client()(b)),
}


@pytest.mark.parametrize("udf", sorted(UDFS))
def test_every_udf_names_each_column_it_reads_and_lacks(udf):
    columns, call = UDFS[udf]
    for missing in columns:
        with pytest.raises(DataError) as exc:
            call(batch_without(columns, missing))
        message = str(exc.value)
        assert udf in message and f"['{missing}']" in message, message
        assert "check the stage that produced it" in message


def test_the_soft_target_builder_also_needs_the_teachers_logprobs():
    with pytest.raises(DataError, match="top_logprobs"):
        build_examples_batch(batch_without((*EXAMPLE_COLUMNS, *SOFT_COLUMNS), "top_logprobs"), tokenizer=None, tasks={},
                             target="response", max_seq_len=8, soft=True)


def write(folder, **columns) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), folder / "part-0.parquet")


def test_training_accepts_samples_with_only_the_columns_it_reads(tmp_path):
    # samples from another tool: no prompt hash, teacher name, token counts or task column
    write(tmp_path / "s", id=["a", "b"], query=["hola", "hello"], label=["es", None], response=[" Spanish.", "?"],
          valid=[True, False])
    assert check_samples(tmp_path / "s", ["langid"]) == {"langid": 1}
    assert training_columns(tmp_path / "s", soft=False) == list(example_columns(False))
    with pytest.raises(DataError, match="no task column"):
        check_samples(tmp_path / "s", ["a", "b"])


def test_training_names_a_column_it_reads_and_the_samples_lack(tmp_path):
    write(tmp_path / "s", id=["a"], task=["langid"], query=["hola"], label=["es"], valid=[True])
    with pytest.raises(DataError, match=r"missing column\(s\) \['response'\]"):
        check_samples(tmp_path / "s", ["langid"])


def test_training_reads_the_logprob_columns_only_for_soft_targets(tmp_path):
    write(tmp_path / "s", id=["a"], task=["langid"], sample_index=[0], query=["hola"], label=["es"],
          response=[" Spanish."], valid=[True], token_ids=[[1]], top_token_ids=[[[1]]], top_logprobs=[[[0.0]]],
          prompt_sha256=["0" * 64])
    hard = training_columns(tmp_path / "s", soft=False)
    assert not set(SOFT_COLUMNS) & set(hard) and {"task", "sample_index"} <= set(hard) and "prompt_sha256" not in hard
    assert set(SOFT_COLUMNS) <= set(training_columns(tmp_path / "s", soft=True))
