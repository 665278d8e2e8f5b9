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
