import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydistill.data.builtin import LABEL_LANGUAGES, build_langid_demo
from raydistill.data.queries import first_row_per_id, normalize_batch, text_id
from raydistill.data.sources import check_columns, explain_read_failure, resolve_source
from raydistill.errors import DataError


def test_normalize_keeps_given_ids_and_hashes_missing():
    batch = pa.table({"q": ["hello", "bonjour", ""], "qid": ["a", None, "c"], "lang": ["en", "fr", None]})
    out = normalize_batch(batch, text_column="q", id_column="qid", gold_column="lang", source="s")
    assert out.column("id").to_pylist() == ["a", text_id("bonjour")]  # empty text dropped
    assert out.column("gold").to_pylist() == ["en", "fr"]
    assert out.column("source").to_pylist() == ["s", "s"]


def test_normalize_hashes_when_no_id_column():
    out = normalize_batch(pa.table({"text": ["x"]}), text_column="text", id_column="id", gold_column="gold", source="s")
    assert out.column("id").to_pylist() == [text_id("x")]
    assert out.column("gold").to_pylist() == [None]


def test_normalize_names_missing_text_column():
    with pytest.raises(DataError, match=r"no column 'text'.*queries.text_column"):
        normalize_batch(pa.table({"prompt": ["x"]}), text_column="text", id_column=None, gold_column=None, source="s")


def test_first_row_per_id_keeps_each_ids_first_row_in_block_order():
    block = pa.table({"id": ["b", "a", "b", "c", "a", "b"], "text": ["1", "2", "3", "4", "5", "6"]})
    out = first_row_per_id(block)
    assert out.to_pydict() == {"id": ["b", "a", "c"], "text": ["1", "2", "4"]}
    assert out.schema == block.schema
    assert first_row_per_id(block.slice(0, 0)).num_rows == 0


def test_resolve_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        resolve_source(str(tmp_path / "missing.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="is empty"):
        resolve_source(str(empty))
    odd = tmp_path / "q.xml"
    odd.write_text("<q/>")
    with pytest.raises(DataError, match="unknown extension"):
        resolve_source(str(odd))
    with pytest.raises(DataError, match="no query files"):
        resolve_source(str(tmp_path / "*.parquet"))
    with pytest.raises(DataError, match="cannot open query source"):
        resolve_source("nosuchscheme://bucket/q.jsonl")


def test_resolve_dir_glob_and_uri(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("a.jsonl", "b.jsonl", "sub/c.jsonl"):
        (tmp_path / name).write_text(json.dumps({"text": name}) + "\n")
    (tmp_path / "_SUCCESS").write_text("")
    assert len(resolve_source(str(tmp_path)).files) == 3  # recursive, markers skipped
    assert [p.rsplit("/", 1)[1] for p in resolve_source(str(tmp_path / "a*.jsonl")).files] == ["a.jsonl"]
    assert len(resolve_source(str(tmp_path / "*" / "*.jsonl")).files) == 1
    uri = resolve_source(f"file://{tmp_path}/sub")
    assert uri.format == "jsonl" and len(uri.files) == 1


def test_resolve_refuses_mixed_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "b.csv").write_text("text\nx\n")
    with pytest.raises(DataError, match="mixes formats"):
        resolve_source(str(tmp_path))


def test_check_columns_reads_only_the_header(tmp_path):
    (tmp_path / "q.csv").write_text("prompt,lang\nhello,en\n")
    with pytest.raises(DataError, match=r"no column 'text' \(columns: \['prompt', 'lang'\]\)"):
        check_columns(resolve_source(str(tmp_path / "q.csv")), "text")
    check_columns(resolve_source(str(tmp_path / "q.csv")), "prompt")
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match="not UTF-8.*re-encode"):
        check_columns(resolve_source(str(tmp_path / "bad.jsonl")), "text")
    pq.write_table(pa.table({"query": ["x"]}), tmp_path / "q.parquet")
    with pytest.raises(DataError, match="no column 'text'"):
        check_columns(resolve_source(str(tmp_path / "q.parquet")), "text")


def test_explain_read_failure_finds_wrapped_causes():
    try:
        try:
            b"\xff".decode("utf-8")
        except UnicodeDecodeError as inner:
            raise RuntimeError("task failed") from inner
    except RuntimeError as outer:
        err = explain_read_failure(outer, "q.txt")
    assert err is not None and "not UTF-8" in str(err) and "'q.txt'" in str(err)
    assert explain_read_failure(RuntimeError("worker died"), "q.txt") is None


def test_builtin_demo_split_is_disjoint_and_labelled():
    data = build_langid_demo()
    train_texts = {r["text"] for r in data["train"]}
    eval_texts = {r["text"] for r in data["eval"]}
    assert not train_texts & eval_texts
    golds = {r["gold"] for r in data["eval"]}
    assert golds == {*LABEL_LANGUAGES, "ot"}
    sources = {r["source"] for r in data["train"]}
    assert "code" in sources and "numbers" in sources
    assert data == build_langid_demo()  # deterministic


def test_csv_query_columns_are_read_as_text(tmp_path):
    """Ids that look like numbers keep their digits, and every file of a source reads the same types."""
    import pyarrow.csv as pacsv

    from raydistill.config import QueriesConfig
    from raydistill.data.queries import csv_column_types

    (tmp_path / "q.csv").write_text("qid,question,lang,extra\n00123,42,1e5,7\n")
    cfg = QueriesConfig(train_path="x", eval_path="y", text_column="question", id_column="qid", gold_column="lang")
    row = pacsv.read_csv(tmp_path / "q.csv", convert_options=csv_column_types(cfg)).to_pylist()[0]
    assert row == {"qid": "00123", "question": "42", "lang": "1e5", "extra": 7}
