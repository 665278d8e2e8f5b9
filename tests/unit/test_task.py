import pytest

from raydistill.errors import ConfigError
from raydistill.tasks.task import REJECT_EMPTY, REJECT_NO_LABEL, TaskSpec, load_task


@pytest.fixture(scope="module")
def langid():
    return load_task("langid")


@pytest.mark.parametrize(
    "response,label",
    [
        (" Spanish.", "es"),
        (" the Urdu language", "ur"),
        ("Simplified Chinese (Mandarin).", "zh"),
        (" Italian.", "ot"),
        ("es", "es"),
        ("Other", "ot"),
        (" English, not German.", "en"),  # earliest phrase wins
        (" Python code", "ot"),
    ],
)
def test_parse_maps_names_and_codes(langid, response, label):
    result = langid.parse(response)
    assert result.valid and result.label == label and result.reject_reason is None


@pytest.mark.parametrize("response,reason", [("", REJECT_EMPTY), (None, REJECT_EMPTY), ("  ", REJECT_EMPTY),
                                             (" a mystery", REJECT_NO_LABEL), ("Spanishness", REJECT_NO_LABEL)])
def test_parse_rejects(langid, response, reason):
    result = langid.parse(response)
    assert not result.valid and result.label is None and result.reject_reason == reason


def test_labels_are_the_builtin_set(langid):
    assert list(langid.labels) == ["ar", "de", "el", "en", "es", "fr", "hi", "ru", "tr", "ur", "vi", "zh", "ot"]


def test_teacher_sees_prompt_student_does_not(langid):
    teacher = langid.teacher_messages("Hola amigo")
    student = langid.student_messages("Hola amigo")
    joined = " ".join(m["content"] for m in teacher)
    assert "Hola amigo" in joined and teacher[0]["role"] == "system" and len(joined) > 100
    assert student == [{"role": "user", "content": "Hola amigo"}]


def test_target_text(langid):
    assert langid.target_text("es", " Spanish.", "label") == "Spanish"
    assert langid.target_text("es", " Spanish.", "response") == "This text is written in Spanish."
    with pytest.raises(ValueError):
        langid.target_text(None, "", "label")


def test_prompt_hash_changes_with_prompt(langid):
    other = TaskSpec.model_validate({**langid.model_dump(), "system_prompt": langid.system_prompt + " Be brief."})
    assert other.prompt_sha256 != langid.prompt_sha256


def test_task_validation(tmp_path):
    with pytest.raises(ValueError, match="query"):
        TaskSpec(name="t", user_template="no slot", labels={"a": "A"})
    with pytest.raises(ValueError, match="system prompt"):
        TaskSpec(name="t", system_prompt="{query}", labels={"a": "A"})
    with pytest.raises(ValueError, match="unknown labels"):
        TaskSpec(name="t", labels={"a": "A"}, aliases={"x": "b"})
    with pytest.raises(ConfigError, match="not found"):
        load_task("nosuchtask")
    bad = tmp_path / "t.yaml"
    bad.write_text("name: t\nsystem_prompt_file: missing.txt\nlabels: {a: A}\n")
    with pytest.raises(ConfigError, match="system_prompt_file"):
        load_task(str(bad))


def test_fallback_label(langid):
    lenient = TaskSpec.model_validate({**langid.model_dump(), "fallback_label": "ot"})
    assert lenient.parse(" gibberish").label == "ot"
    assert lenient.parse(" French").label == "fr"
    assert not lenient.parse("").valid


def test_long_task_puts_demonstrations_before_the_query(tmp_path):
    demos = tmp_path / "demos.jsonl"
    demos.write_text('{"query": "Hallo Welt", "answer": "This text is written in German.", "label": "de"}\n\n'
                     '{"query": "print(1)", "answer": "This text is written in Other.", "label": "ot"}\n')
    path = tmp_path / "task.yaml"
    path.write_text("extends: langid\nname: long\ndemonstrations_file: demos.jsonl\n")
    task = load_task(str(path))
    short = load_task("langid")
    assert task.labels == short.labels and task.aliases == short.aliases  # inherited
    messages = task.teacher_messages("Hola amigo")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert messages[1]["content"].endswith("Hallo Welt") and messages[2]["content"] == "This text is written in German."
    assert messages[-1]["content"].endswith("Hola amigo")
    # every query shares everything before its own turn: the engine's cached prefix
    assert task.teacher_messages("x")[:-1] == messages[:-1]
    assert task.prompt_sha256 != short.prompt_sha256
    reordered = TaskSpec.model_validate({**task.model_dump(), "demonstrations": task.model_dump()["demonstrations"][::-1]})
    assert reordered.prompt_sha256 != task.prompt_sha256


def test_bad_demonstrations_are_one_line_errors(tmp_path):
    path = tmp_path / "task.yaml"
    path.write_text("extends: langid\nname: long\ndemonstrations_file: demos.jsonl\n")
    with pytest.raises(ConfigError, match="demonstrations_file"):
        load_task(str(path))
    (tmp_path / "demos.jsonl").write_text("not json\n")
    with pytest.raises(ConfigError, match="line 1 is not JSON"):
        load_task(str(path))
    (tmp_path / "demos.jsonl").write_text('{"query": "x", "answer": "y", "label": "xx"}\n')
    with pytest.raises(ConfigError, match="unknown labels"):
        load_task(str(path))
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\nname: l\n")
    with pytest.raises(ConfigError, match="extends"):
        load_task(str(tmp_path / "loop.yaml"))


def test_builtin_long_task_is_long_and_valid():
    task = load_task("langid-long")
    assert len(task.demonstrations) >= 12
    assert {d.label for d in task.demonstrations} >= {"ar", "de", "el", "en", "es", "fr", "hi", "ru", "tr", "ur", "vi", "zh", "ot"}
    assert all(d.answer.startswith(task.assistant_prefix) for d in task.demonstrations)
    assert all(task.parse(d.answer.removeprefix(task.assistant_prefix)).label == d.label for d in task.demonstrations)


@pytest.mark.parametrize("setting,first", [("default", None), ("none", ""), ("Answer briefly.", "Answer briefly.")])
def test_student_system_prompt(langid, setting, first):
    task = TaskSpec.model_validate({**langid.model_dump(), "student_system_prompt": setting})
    messages = task.student_messages("Hola")
    assert messages[-1] == {"role": "user", "content": "Hola"}
    if first is None:
        assert len(messages) == 1  # the chat template adds its own default
    else:
        assert messages[0] == {"role": "system", "content": first}
    own = [{"role": "system", "content": "mine"}, {"role": "user", "content": "Hola"}]
    assert task.with_student_system(own) == own  # a client's own system message wins


def test_pipeline_config_overrides_the_student_system_prompt():
    from raydistill.config import TaskConfig
    from raydistill.tasks.task import task_for

    assert task_for(TaskConfig(name="langid-long")).student_system_prompt == "default"
    task = task_for(TaskConfig(name="langid-long", student_system_prompt="none"))
    assert task.student_system_prompt == "none" and task.student_messages("x")[0] == {"role": "system", "content": ""}


@pytest.mark.parametrize("name", ["langid", "langid-long", "langid-rules"])
def test_every_builtin_task_loads_and_parses(name):
    task = load_task(name)
    assert task.parse("This text is written in Spanish.").label == "es"
    assert task.parse("the Khmer language").label == "ot"
    messages = task.teacher_messages("Hola")
    assert messages[-1]["content"].endswith("Hola")


def test_rules_prompt_is_long_and_covers_the_hard_cases():
    prompt = load_task("langid-rules").system_prompt
    assert len(prompt.split()) >= 500
    for topic in ("code", "URL", "numbers", "Mixed text", "Urdu", "Ukrainian"):
        assert topic in prompt


def test_a_free_task_accepts_any_non_empty_answer_and_learns_the_whole_response():
    task = TaskSpec(name="t", answer="free", system_prompt="Be brief.", assistant_prefix="Sure:")
    assert task.free and task.parse(" anything at all ").valid and task.parse(" anything").label is None
    assert task.parse("  ").reject_reason == REJECT_EMPTY
    assert task.target_text(None, " do this.", "label") == "Sure: do this."  # always the response


@pytest.mark.parametrize("fields,needle", [({"answer": "free", "fallback_label": "x", "labels": {"x": "X"}}, "labels, fallback_label"),
                                           ({"answer": "labelled"}, "needs labels")])
def test_answer_kind_and_labels_must_agree(fields, needle):
    with pytest.raises(ValueError, match=needle):
        TaskSpec(name="t", **fields)
