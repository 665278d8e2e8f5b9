import json
import time

import pytest

from raydistill.tasks.languages import LANGID, ORDINARY_WORDS, iso639_1_languages, language_aliases, language_names
from raydistill.tasks.task import REJECT_EMPTY, REJECT_NO_LABEL, TaskSpec, load_task

# Words a teacher or student writes around a language name; none may be read as a language.
ANSWER_WORDS = [
    "this", "text", "is", "written", "in", "the", "a", "an", "it", "its", "appears", "to", "be", "seems",
    "looks", "like", "language", "languages", "script", "alphabet", "characters", "words", "sentence", "mix",
    "mixed", "of", "and", "or", "not", "but", "no", "yes", "i", "am", "sure", "unknown", "unclear", "other",
    "code", "programming", "numbers", "numeric", "digits", "url", "link", "symbols", "emoji", "dialect",
    "standard", "modern", "old", "new", "simplified", "traditional", "formal", "informal", "some", "kind",
    "probably", "likely", "possibly", "maybe", "mostly", "also", "same", "different", "even", "are", "male",
    "mono", "iron", "scottish", "afar", "occidental", "western", "eastern", "northern", "southern", "central",
    "north", "south", "east", "west", "official", "native", "spoken",
]

LABEL_AUTONYMS = {
    "Deutsch": "de", "Español": "es", "Français": "fr", "Русский": "ru", "中文": "zh", "हिन्दी": "hi",
    "اردو": "ur", "Türkçe": "tr", "Tiếng Việt": "vi", "Ελληνικά": "el", "العربية": "ar", "English": "en",
}


@pytest.fixture(scope="module")
def langid():
    return load_task("langid")


def test_names_come_from_iso639_1():
    codes = iso639_1_languages()
    names = language_names()
    assert 180 <= len(codes) <= 200 and "in" not in codes  # deprecated codes (in -> id) are left out
    assert len(names) > 300 and set(names.values()) <= set(codes)
    assert names["khmer"] == "km" and names["bahasa indonesia"] == "id" and names["italiano"] == "it"
    assert names["castilian"] == "es" and names["swahili"] == "sw"  # registry synonyms, qualifier dropped
    assert all(name == name.lower().strip() for name in names)


def test_ordinary_words_are_not_language_names():
    names = language_names()
    assert not [word for word in ANSWER_WORDS if word in names]
    assert not ORDINARY_WORDS & set(names)


@pytest.mark.parametrize(
    "response,label",
    [
        (" the Khmer language", "ot"),
        (" Khmer language.", "ot"),
        (" Bahasa Indonesia.", "ot"),
        (" Italian.", "ot"),
        (" Swahili", "ot"),
        (" Farsi", "ot"),  # a kept alias: the list has "Persian" only
        ("This text is written in Khmer, not English.", "ot"),  # earliest match wins
        ("This text is written in Russian.", "ru"),
        (" Arabic", "ar"),
        (" the Urdu language", "ur"),
        (" Chinese", "zh"),
        (" Francais", "fr"),  # accent-free spelling of an autonym
        (" Modern Greek", "el"),
    ],
)
def test_langid_parses_any_language_name(langid, response, label):
    result = langid.parse(response)
    assert result.valid and result.label == label and result.reject_reason is None


@pytest.mark.parametrize("autonym,label", LABEL_AUTONYMS.items())
def test_label_language_autonyms_map_to_their_label(langid, autonym, label):
    assert langid.parse(f"This text is written in {autonym}.").label == label


@pytest.mark.parametrize(
    "response,label",
    [
        (" Spanish.", "es"),
        ("Simplified Chinese (Mandarin).", "zh"),
        ("es", "es"),
        ("Other", "ot"),
        (" English, not German.", "en"),
        (" Python code", "ot"),
        (" numbers and a URL", "ot"),
        (" Portuguese", "ot"),
        (" Japanese.", "ot"),
        (" Polish", "ot"),
        (" Norwegian", "ot"),
        (" Vietnamese language", "vi"),
    ],
)
def test_ordinary_answers_parse_as_before(langid, response, label):
    assert langid.parse(response).label == label


@pytest.mark.parametrize(
    "response,reason",
    [("", REJECT_EMPTY), (None, REJECT_EMPTY), ("  ", REJECT_EMPTY), (" a mystery", REJECT_NO_LABEL),
     (" gibberish, it is not sure", REJECT_NO_LABEL), ("Spanishness", REJECT_NO_LABEL), (" Khmerish", REJECT_NO_LABEL)],
)
def test_rejects_keep_their_reasons(langid, response, reason):
    result = langid.parse(response)
    assert not result.valid and result.label is None and result.reject_reason == reason


def test_task_without_the_setting_is_unchanged(langid):
    plain = TaskSpec.model_validate({**langid.model_dump(), "listed_aliases": {}})
    assert plain.parse(" the Khmer language").reject_reason == REJECT_NO_LABEL
    assert plain.parse(" Deutsch").label == "de"  # an alias, not the list
    yes_no = TaskSpec(name="t", labels={"yes": "Yes", "no": "No"})  # "no" is also Norwegian's code
    assert yes_no.parse(" Norwegian").reject_reason == REJECT_NO_LABEL
    assert yes_no.parse(" No.").label == "no"


def test_listed_aliases_must_name_labels():
    with pytest.raises(ValueError, match="unknown labels"):
        TaskSpec(name="t", labels={"a": "A"}, listed_aliases={"x": "ot"})


def test_the_langid_task_ships_the_generated_list(langid):
    """The task's data file is what `python -m raydistill.tasks.languages` writes today."""
    committed = json.loads((LANGID / "language_aliases.json").read_text(encoding="utf-8"))
    assert committed == language_aliases(langid.labels) == langid.listed_aliases
    assert committed["deutsch"] == "de" and committed["khmer"] == "ot"


def test_parsing_has_no_pathological_cost(langid):
    # Not a speed claim (~0.1 s here when idle): it catches a name list rebuilt per call or a
    # backtracking regex, which take minutes; the bound is loose so a loaded machine passes.
    answers = [" the Khmer language", "This text is written in Russian.", " a mystery", " Español"] * 2500
    langid.parse("warm up")  # the name list and the regex are built once per task
    start = time.perf_counter()
    for answer in answers:
        langid.parse(answer)
    assert time.perf_counter() - start < 10.0
