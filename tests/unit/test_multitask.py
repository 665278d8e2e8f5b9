"""Several tasks in one student (pure parts): config rules, tags, ids, training shares, routes,
per-task training examples and the per-task report table."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydistill.config import load_config
from raydistill.data.queries import with_task
from raydistill.errors import ConfigError, DataError
from raydistill.evaluate.report import task_table
from raydistill.serve.openai_api import ChatCompletionRequest
from raydistill.serve.routing import RequestError, plan_request, routes_for
from raydistill.student.examples import build_examples_batch
from raydistill.student.train import check_samples
from raydistill.tasks.pipeline_tasks import repeats, run_tasks, task_factors

TWO = """run_dir: r
tasks:
  - {tag: lang, name: langid, queries: {train_path: a.jsonl, eval_path: b.jsonl}}
  - {tag: rules, name: langid-rules, queries: {train_path: c.jsonl, eval_path: d.jsonl}}
"""


def _cfg(tmp_path, text, overrides=()):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return load_config(path, list(overrides))


def test_tags_must_be_unique_and_not_prefixes(tmp_path):
    with pytest.raises(ConfigError, match="tag 'lang' is used twice"):
        _cfg(tmp_path, TWO.replace("tag: rules", "tag: lang"))
    with pytest.raises(ConfigError, match="tag 'lang' is a prefix of 'language'"):
        _cfg(tmp_path, TWO.replace("tag: rules", "tag: language"))
    with pytest.raises(ConfigError, match="bad value for 'tasks.0.tag'"):
        _cfg(tmp_path, TWO.replace("tag: lang", "tag: 'Lang ID'"))


def test_one_form_or_the_other(tmp_path):
    with pytest.raises(ConfigError, match="either task \\+ queries .* or tasks"):
        _cfg(tmp_path, TWO + "queries: {train_path: a.jsonl, eval_path: b.jsonl}\n")
    with pytest.raises(ConfigError, match="either task \\+ queries"):
        _cfg(tmp_path, TWO + "task: {name: langid}\n")
    with pytest.raises(ConfigError, match="weight on every task or on none"):
        _cfg(tmp_path, TWO.replace("name: langid,", "name: langid, weight: 2,"))
    with pytest.raises(ConfigError, match="unknown key 'tasks.1.queries.dedupe'; did you mean 'tasks.1.queries.dedup'"):
        _cfg(tmp_path, TWO.replace("{train_path: c.jsonl", "{dedupe: true, train_path: c.jsonl"))


def test_run_tasks_apply_tags_and_a_bad_task_file_is_named(tmp_path):
    lang, rules = run_tasks(_cfg(tmp_path, TWO))
    assert (lang.key, rules.key) == ("lang", "rules") and lang.tagged
    assert lang.spec.student_messages("Hola")[-1]["content"] == "[lang] Hola"
    assert lang.model_name("student") == "student/lang"
    single = run_tasks(_cfg(tmp_path, "run_dir: r\nqueries: {train_path: a, eval_path: b}\n"))[0]
    assert single.model_name("student") == "student" and single.spec.student_messages("Hola")[-1]["content"] == "Hola"
    with pytest.raises(ConfigError, match="task 'rules': task 'nope' not found"):
        run_tasks(_cfg(tmp_path, TWO.replace("name: langid-rules", "name: nope")))


def test_with_task_namespaces_ids_only_for_several_tasks():
    table = pa.table({"id": ["1", "2"], "text": ["a", "b"], "gold": [None, "x"], "source": ["s", "s"]})
    tagged = with_task(table, key="lang", id_prefix="lang/")
    assert tagged["id"].to_pylist() == ["lang/1", "lang/2"] and tagged["task"].to_pylist() == ["lang"] * 2
    assert with_task(table, key="langid", id_prefix="")["id"].to_pylist() == ["1", "2"]


def test_factors_follow_weights_and_default_to_natural_shares():
    assert task_factors({"a": 300, "b": 100}, {"a": None, "b": None}) == {"a": 1.0, "b": 1.0}
    factors = task_factors({"a": 300, "b": 100}, {"a": 1.0, "b": 1.0})  # equal shares: b repeated, a subsampled
    assert factors == pytest.approx({"a": 2 / 3, "b": 2.0})
    copies = [repeats(factors["a"], f"q{i}") for i in range(3000)]
    assert set(copies) == {0, 1} and abs(sum(copies) / 3000 - 2 / 3) < 0.03
    assert [repeats(2.0, f"q{i}") for i in range(5)] == [2] * 5
    assert repeats(0.5, "q1") == repeats(0.5, "q1")  # reproducible


def test_examples_use_each_tasks_tag_and_repeat_by_factor(tmp_path, smollm2_tokenizer):
    lang, rules = run_tasks(_cfg(tmp_path, TWO))
    tasks = {"lang": lang.spec, "rules": rules.spec}
    batch = {"id": np.array(["lang/1", "rules/1"], dtype=object), "task": np.array(["lang", "rules"], dtype=object),
             "query": np.array(["Hola", "Hola"], dtype=object), "label": np.array(["es", "es"], dtype=object),
             "response": np.array([" Spanish", " Spanish"], dtype=object), "sample_index": np.array([0, 0])}
    out = build_examples_batch(batch, tokenizer=smollm2_tokenizer, tasks=tasks, target="label", max_seq_len=256,
                               factors={"lang": 1.0, "rules": 3.0})
    assert list(out["task"]) == ["lang", "rules", "rules", "rules"]
    texts = [smollm2_tokenizer.decode(ids) for ids in out["input_ids"][:2]]
    assert "[lang] Hola" in texts[0] and "[rules] Hola" in texts[1]


def test_routes_name_every_task_on_shared_engines(tmp_path):
    tasks = run_tasks(_cfg(tmp_path, TWO))
    routes = routes_for(True, tasks, student_prefix=False)
    assert set(routes) == {f"{s}/{t}" for s in ("teacher", "base", "student") for t in ("lang", "rules")}
    assert {r.engine for name, r in routes.items() if name.startswith("student/")} == {"student"}

    def chat(model):
        return ChatCompletionRequest.model_validate({"model": model, "messages": [{"role": "user", "content": "Hola"}]})

    student = plan_request(chat("student/rules"), routes)
    assert student.engine == "student" and student.messages[-1]["content"] == "[rules] Hola"
    teacher = plan_request(chat("teacher/rules"), routes)
    assert teacher.messages == tasks[1].spec.teacher_messages("Hola")
    with pytest.raises(RequestError, match="model 'student' not found; available: .*'student/lang'"):
        plan_request(chat("student"), routes)


def _samples(folder, tasks_valid):
    from raydistill.schema import SAMPLES

    rows = [{"id": f"{t}/{i}", "task": t, "query": "q", "sample_index": 0, "prompt_sha256": "0", "teacher_model": "m",
             "valid": v} for t, valid in tasks_valid.items() for i, v in enumerate(valid)]
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=SAMPLES), folder / "part-0.parquet")
    return folder


def test_a_task_without_valid_samples_is_refused_by_name(tmp_path):
    ok = _samples(tmp_path / "ok", {"lang": [True, False], "rules": [True, True]})
    assert check_samples(ok, ["lang", "rules"]) == {"lang": 1, "rules": 2}
    empty = _samples(tmp_path / "empty", {"lang": [True], "rules": [False, False]})
    with pytest.raises(DataError, match=r"task\(s\) \['rules'\] have no valid teacher samples"):
        check_samples(empty, ["lang", "rules"])
    with pytest.raises(DataError, match=r"hold tasks \['rules'\] that the config does not list"):
        check_samples(ok, ["lang", "other"])


def test_task_table_rows():
    part = {"systems": {"teacher": {"accuracy": 0.8, "parse_rate": 1.0, "mean_input_tokens": 1200.0, "requests": 50},
                        "student": {"accuracy": 0.75, "parse_rate": 1.0, "mean_input_tokens": 40.0, "requests": 50}},
            "student_vs_teacher": {"agreement": 0.9, "agreement_ci95": [0.79, 0.96]},
            "payoff": {"input_tokens_teacher_over_student": 30.0}}
    table = task_table({"lang": part})
    assert "| lang | 50 | 80.0% | 75.0% | 90.0% [79.0, 96.0] | 100.0% | 100.0% | 1200 → 40 (30.0x) |" in table
