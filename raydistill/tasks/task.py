"""A task is data: a target prompt, where it goes, an answer parser, and what the student says.

Everything here is pure (no Ray, no model): rendering chat messages for teacher and student,
parsing a response into a label, and the training target for a parsed label.
"""

from __future__ import annotations

import hashlib
import re
from functools import cached_property
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from raydistill.errors import ConfigError

BUILTIN_DIR = Path(__file__).parent
QUERY_SLOT = "{query}"

# reject reasons (stable strings; they appear in Parquet and manifests)
REJECT_EMPTY = "empty_response"
REJECT_NO_LABEL = "no_label_found"
REJECT_ENGINE = "engine_error"


class ParseResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    label: str | None
    valid: bool
    reject_reason: str | None


class TaskSpec(BaseModel):
    """A task file (YAML). Paths inside it are relative to the file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""
    system_prompt: str = Field("", description="The teacher's system message (read from system_prompt_file).")
    user_template: str = Field(QUERY_SLOT, description="The teacher's user turn, with a {query} slot.")
    assistant_prefix: str = Field("", description="Text the teacher's answer is forced to start with.")
    labels: dict[str, str] = Field(..., description="label code -> the answer the student learns to say.")
    aliases: dict[str, str] = Field(default_factory=dict, description="extra phrase -> label code (case-insensitive).")
    fallback_label: str | None = Field(None, description="Label for a non-empty answer naming no known phrase (else rejected).")

    @model_validator(mode="after")
    def _check(self) -> TaskSpec:
        if self.user_template.count(QUERY_SLOT) != 1:
            raise ValueError(f"user_template needs exactly one {QUERY_SLOT} slot")
        if QUERY_SLOT in self.system_prompt:
            raise ValueError(f"the system prompt must not contain {QUERY_SLOT}; put the query in user_template")
        unknown = sorted({v for v in [*self.aliases.values(), self.fallback_label] if v and v not in self.labels})
        if unknown:
            raise ValueError(f"aliases map to unknown labels {unknown}; add them to labels")
        return self

    # ---- the target prompt ------------------------------------------------------------
    @cached_property
    def prompt_sha256(self) -> str:
        """Identifies the target prompt p exactly: system prompt, user template, answer prefix."""
        blob = "\x00".join([self.system_prompt, self.user_template, self.assistant_prefix])
        return hashlib.sha256(blob.encode()).hexdigest()

    def teacher_messages(self, query: str) -> list[dict[str, str]]:
        """The chat the teacher sees: the query wrapped in the target prompt p."""
        user = {"role": "user", "content": self.user_template.replace(QUERY_SLOT, query)}
        return [{"role": "system", "content": self.system_prompt}, user] if self.system_prompt else [user]

    @staticmethod
    def student_messages(query: str) -> list[dict[str, str]]:
        """The chat the student sees, in training and in serving alike: the bare query."""
        return [{"role": "user", "content": query}]

    # ---- parsing ------------------------------------------------------------------------
    @cached_property
    def _phrase_to_label(self) -> dict[str, str]:
        table = {answer.lower(): code for code, answer in self.labels.items()}
        table.update({phrase.lower(): code for phrase, code in self.aliases.items()})
        return table

    @cached_property
    def _phrase_regex(self) -> re.Pattern[str]:
        # Longest phrases first so "simplified chinese" wins over "chinese".
        phrases = sorted(self._phrase_to_label, key=len, reverse=True)
        return re.compile(r"(?<!\w)(" + "|".join(re.escape(p) for p in phrases) + r")(?!\w)")

    def parse(self, response: str | None) -> ParseResult:
        """Map a free-text answer to a label: a bare label code, or the earliest known phrase."""
        text = (response or "").strip()
        if not text:
            return ParseResult(label=None, valid=False, reject_reason=REJECT_EMPTY)
        lowered = text.lower()
        bare = lowered.strip(" .\"'`")
        if bare in self.labels:
            return ParseResult(label=bare, valid=True, reject_reason=None)
        match = self._phrase_regex.search(lowered)
        if match is None:
            if self.fallback_label:
                return ParseResult(label=self.fallback_label, valid=True, reject_reason=None)
            return ParseResult(label=None, valid=False, reject_reason=REJECT_NO_LABEL)
        return ParseResult(label=self._phrase_to_label[match.group(1)], valid=True, reject_reason=None)

    def target_text(self, label: str | None, response: str, target: Literal["label", "response"]) -> str:
        """What the student is trained to say for one teacher sample."""
        if target == "response":
            return (self.assistant_prefix + response).strip()
        if label is None:
            raise ValueError("target 'label' needs a parsed label; train on valid rows only")
        return self.labels[label]


def load_task(name_or_path: str) -> TaskSpec:
    """Load a built-in task by name (``langid``) or a task YAML by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = BUILTIN_DIR / name_or_path / "task.yaml"
    if not path.is_file():
        builtins = sorted(p.parent.name for p in BUILTIN_DIR.glob("*/task.yaml"))
        raise ConfigError(f"task {name_or_path!r} not found; use a built-in task {builtins} or a path to a task YAML")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        raise ConfigError(f"task file {str(path)!r} is not valid YAML; fix the syntax") from None
    for key in ("system_prompt", "user_template"):
        file_name = data.pop(f"{key}_file", None)
        if file_name is not None:
            file_path = path.parent / file_name
            if not file_path.is_file():
                raise ConfigError(f"task {str(path)!r}: {key}_file {str(file_path)!r} not found; fix {key}_file")
            data[key] = file_path.read_text().strip()
    try:
        return TaskSpec.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "<root>"
        raise ConfigError(f"task file {str(path)!r}: '{key}': {first['msg']}; fix the task file") from None
