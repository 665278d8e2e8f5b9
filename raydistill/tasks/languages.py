"""The langid task's language names, generated: lowercased name -> ISO 639-1 code -> label.

Not used at run time: it writes ``tasks/langid/language_aliases.json``, the langid task's own data
(its ``aliases_file``), so the parser is generic and the language list is a file of the task:

    python -m raydistill.tasks.languages     (needs the dev extra's langcodes)
 The names are not a hand list: they come from the ``langcodes`` package (with its
``language_data``). For every language that has a current (not deprecated) two-letter ISO 639-1
code in the IANA language subtag registry that langcodes ships, we take

* its English name from CLDR ("Khmer", "Bangla", "Filipino"),
* the registry's English descriptions, which add synonyms ("Castilian", "Flemish", "Sinhalese",
  "Modern Greek"), with qualifiers in parentheses dropped ("Swahili (macrolanguage)" -> "swahili"),
* its autonym, the name in the language itself, from CLDR ("Deutsch", "bahasa Indonesia",
  "русский", "中文"),
* and the accent-free spelling of a Latin-script name ("français" -> "francais"), as models write it.

Why only languages with an ISO 639-1 code (about 185): they are the widely written languages a
teacher names, and their names are distinctive. The full ISO 639-3 list (about 8,000 names) and the
synonyms langcodes collects from Wiktionary hold names that are ordinary English words ("Even",
"Are", "Male", "Mono", "Iron" for Ossetian, "Scottish"): with them, answers like "It is written in
mixed languages, even English" would be labelled by accident. The few ISO 639-1 names that are
ordinary English words themselves are left out (``ORDINARY_WORDS``).
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from functools import lru_cache
from pathlib import Path

import yaml

log = logging.getLogger(__name__)

# Registry names that are ordinary English words ("seen from afar", "occidental" = western):
# matching them would label answers that do not name a language.
ORDINARY_WORDS = frozenset({"afar", "occidental"})

_QUALIFIER = re.compile(r"\s*\([^)]*\)")  # "(macrolanguage)", "(1453-)", "(Tonga Islands)"


def iso639_1_languages() -> dict[str, list[str]]:
    """The IANA registry's current two-letter language codes (= ISO 639-1) -> their English
    descriptions, in code order."""
    from langcodes.registry_parser import parse_registry  # see language_names: imported on first use

    entries = (e for e in parse_registry() if e.get("Type") == "language" and "Deprecated" not in e)
    return {e["Subtag"]: e.get("Description", []) for e in sorted(entries, key=lambda e: e["Subtag"]) if len(e["Subtag"]) == 2}


def _clean(name: str) -> str:
    return " ".join(_QUALIFIER.sub("", name).split()).lower()


def _ascii_fold(name: str) -> str | None:
    """The accent-free spelling of a Latin-script name, or None (non-Latin scripts stay as they are:
    stripping their combining marks would change the word)."""
    folded = "".join(ch for ch in unicodedata.normalize("NFKD", name) if not unicodedata.combining(ch))
    return folded if folded != name and folded.isascii() else None


@lru_cache(maxsize=1)
def language_names() -> dict[str, str]:
    """Lowercased language name -> ISO 639-1 code, built once per process (about 0.3 s)."""
    import langcodes

    codes = iso639_1_languages()
    languages = {code: langcodes.Language.get(code, normalize=False) for code in codes}
    # English names first, then autonyms: where the two collide ("Akan" is the English name of ak
    # and the autonym of tw), the English name is what an English-speaking teacher means.
    named = [(code, lang.display_name("en")) for code, lang in languages.items()]
    named += [(code, description) for code, descriptions in codes.items() for description in descriptions]
    named += [(code, lang.autonym()) for code, lang in languages.items()]
    table: dict[str, str] = {}
    for code, raw in named:
        name = _clean(raw)
        for spelling in (name, _ascii_fold(name)):
            if spelling and spelling not in ORDINARY_WORDS:
                table.setdefault(spelling, code)
    log.debug("language names: %d names of %d ISO 639-1 languages from langcodes", len(table), len(codes))
    return table


LANGID = Path(__file__).parent / "langid"
OTHER = "ot"  # the langid label of any language that is not one of its labels


def language_aliases(labels: dict[str, str], other: str = OTHER) -> dict[str, str]:
    """Every listed language name -> its own label when its ISO 639-1 code is one ("Español" -> es:
    the label languages' autonyms), else ``other``."""
    return {name: code if code in labels else other for name, code in sorted(language_names().items())}


def main() -> None:
    labels = yaml.safe_load((LANGID / "task.yaml").read_text())["labels"]
    table = language_aliases(labels)
    (LANGID / "language_aliases.json").write_text(json.dumps(table, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    print(f"wrote {len(table)} names to {LANGID / 'language_aliases.json'}")  # noqa: T201


if __name__ == "__main__":
    main()
