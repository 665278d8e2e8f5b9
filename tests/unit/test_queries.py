import json

import pyarrow as pa
import pytest

from raydistill.data.builtin import LABEL_LANGUAGES, build_langid_demo
from raydistill.data.queries import normalize_batch, resolve_local_files, text_id
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


def test_resolve_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        resolve_local_files(str(tmp_path / "missing.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        resolve_local_files(str(empty))
    odd = tmp_path / "q.xml"
    odd.write_text("<q/>")
    with pytest.raises(DataError, match="unknown extension"):
        resolve_local_files(str(odd))
    with pytest.raises(DataError, match="no query files"):
        resolve_local_files(str(tmp_path / "*.parquet"))


def test_resolve_dir_and_glob(tmp_path):
    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / name).write_text(json.dumps({"text": name}) + "\n")
    assert len(resolve_local_files(str(tmp_path))) == 2
    assert len(resolve_local_files(str(tmp_path / "a*.jsonl"))) == 1


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
