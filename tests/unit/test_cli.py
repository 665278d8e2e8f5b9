"""The CLI's surface: every verb documents itself and takes the flags the README promises."""

import pytest

from raydistill.cli import VERBS, build_parser


def help_text(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args([*argv, "--help"])
    assert done.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


def test_top_level_help_lists_every_verb(capsys):
    text = help_text(capsys)
    assert all(verb in text for verb in VERBS)


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_documents_itself_and_its_flags(capsys, verb):
    text = help_text(capsys, verb)
    assert " ".join(VERBS[verb].split()) in text
    assert "--verbose" in text and "overrides" in text
    usage = text.split(" ".join(VERBS[verb].split()))[0]
    assert ("config" in usage) == (verb != "demo")  # the demo brings its own config
    assert ("--dry-run" in text) == (verb not in ("plan", "config"))
    assert ("--resume" in text) == (verb in ("generate", "train", "run", "demo"))
