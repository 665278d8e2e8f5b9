"""A task is data: a target prompt, where it goes, an answer parser, and what the student says.

Everything here is pure (no Ray, no model): rendering chat messages for teacher and student,
parsing a response into a label, and the training target for a parsed label.
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

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


class Demonstration(BaseModel):
    """One worked example shown to the teacher as a prior user/assistant exchange."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    query: str
    answer: str = Field(..., description="The assistant turn, in full (forced answer prefix included).")
    label: str | None = Field(None, description="The demonstrated label (documentation, checked against labels).")


STUDENT_SYSTEM_DEFAULT = "default"  # no system message: the chat template's own default, if it has one
STUDENT_SYSTEM_NONE = "none"  # an empty system message: templates that add a default then add none


ANSWER_LABELLED: Literal["labelled"] = "labelled"  # a classifier: each answer is parsed into one of the task's labels
ANSWER_FREE: Literal["free"] = "free"  # any text: the student learns the teacher's whole response


class TaskSpec(BaseModel):
    """A task file (YAML). Paths inside it are relative to the file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""
    answer: Literal["labelled", "free"] = Field(
        ANSWER_LABELLED,
        description="labelled: answers are parsed into labels (accuracy, agreement, confusion); free: any non-empty "
        "answer is valid, the student learns the whole response and is scored by the prompted teacher (fidelity).",
    )
    system_prompt: str = Field("", description="The teacher's system message (read from system_prompt_file).")
    user_template: str = Field(QUERY_SLOT, description="The teacher's user turn, with a {query} slot.")
    assistant_prefix: str = Field("", description="Text the teacher's answer is forced to start with.")
    demonstrations: list[Demonstration] = Field(
        default_factory=list,
        description="Worked examples as prior chat turns after the system prompt (read from demonstrations_file, JSONL).",
    )
    student_system_prompt: str = Field(
        STUDENT_SYSTEM_DEFAULT,
        description="The student's system message, in training and serving alike: 'default' (the chat "
        "template's own, e.g. SmolLM2's 20-token one), 'none' (an empty system message) or a given text.",
    )
    student_tag: str = Field("", description="Set by multi-task pipelines (tasks[].tag), not in task files: the "
                             "student's query is '[tag] query', the few tokens that stand in for this task's prompt.")
    labels: dict[str, str] = Field(
        default_factory=dict, description="label code -> the answer the student learns to say (labelled tasks).")
    aliases: dict[str, str] = Field(default_factory=dict, description="extra phrase -> label code (case-insensitive).")
    fallback_label: str | None = Field(None, description="Label for a non-empty answer naming no known phrase (else rejected).")
    listed_aliases: dict[str, str] = Field(
        default_factory=dict,
        description="A long generated list of phrase -> label (read from aliases_file, JSON), below labels and "
        "aliases: e.g. the langid task's names of every language (tasks/langid/language_aliases.json).")

    @model_validator(mode="after")
    def _check(self) -> TaskSpec:
        if self.answer == ANSWER_FREE:
            parser_keys = [k for k in ("labels", "aliases", "listed_aliases", "fallback_label") if getattr(self, k)]
            if parser_keys:
                raise ValueError(f"a free task has no labels, but {', '.join(parser_keys)} set; remove them or set "
                                 "answer: labelled")
        elif not self.labels:
            raise ValueError("a labelled task needs labels (label code -> the answer the student learns to say); "
                             "add labels, or set answer: free for free-form answers")
        if self.user_template.count(QUERY_SLOT) != 1:
            raise ValueError(f"user_template needs exactly one {QUERY_SLOT} slot")
        if QUERY_SLOT in self.system_prompt:
            raise ValueError(f"the system prompt must not contain {QUERY_SLOT}; put the query in user_template")
        demo_labels = [d.label for d in self.demonstrations]
        named = [*self.aliases.values(), *set(self.listed_aliases.values()), self.fallback_label, *demo_labels]
        unknown = sorted({v for v in named if v and v not in self.labels})
        if unknown:
            raise ValueError(f"aliases, fallback labels or demonstrations name unknown labels {unknown}; add them to labels")
        return self

    # ---- the target prompt ------------------------------------------------------------
    @cached_property
    def prompt_sha256(self) -> str:
        """Identifies the target prompt p exactly: system prompt, demonstrations, user template, answer prefix."""
        demos = [f"{d.query}\x01{d.answer}" for d in self.demonstrations]
        blob = "\x00".join([self.system_prompt, *demos, self.user_template, self.assistant_prefix])
        return hashlib.sha256(blob.encode()).hexdigest()

    def teacher_messages(self, query: str) -> list[dict[str, str]]:
        """The chat the teacher sees: the query wrapped in the target prompt p.

        Everything before the last user turn is the same for every query (system prompt, then the
        demonstrations as prior exchanges), so the engine's prefix cache holds it once.
        """
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        for demo in self.demonstrations:
            messages.append({"role": "user", "content": self.user_template.replace(QUERY_SLOT, demo.query)})
            messages.append({"role": "assistant", "content": demo.answer})
        messages.append({"role": "user", "content": self.user_template.replace(QUERY_SLOT, query)})
        return messages

    def student_system_message(self) -> dict[str, str] | None:
        """The system message the student is trained and served with (None: the template's default)."""
        if self.student_system_prompt == STUDENT_SYSTEM_DEFAULT:
            return None
        content = "" if self.student_system_prompt == STUDENT_SYSTEM_NONE else self.student_system_prompt
        return {"role": "system", "content": content}

    def student_messages(self, query: str) -> list[dict[str, str]]:
        """The chat the student sees, in training and in serving alike: the bare query (after the
        task's tag in a multi-task student)."""
        return self.with_student_system([{"role": "user", "content": query}])

    def tagged(self, query: str) -> str:
        return f"[{self.student_tag}] {query}" if self.student_tag else query

    def with_student_system(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """A client's chat as the student was trained on it: the task's tag before the last user
        message, and the task's student system message unless the client sent one of its own."""
        messages = [dict(m) for m in messages]
        if self.student_tag:
            last = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
            if last is not None:
                messages[last]["content"] = self.tagged(str(messages[last].get("content", "")))
        system = self.student_system_message()
        if system is None or any(m.get("role") in ("system", "developer") for m in messages):
            return messages
        return [system, *messages]

    # ---- parsing ------------------------------------------------------------------------
    @cached_property
    def _phrase_to_label(self) -> dict[str, str]:
        table = {answer.lower(): code for code, answer in self.labels.items()}
        table.update({phrase.lower(): code for phrase, code in self.aliases.items()})
        for phrase, code in self.listed_aliases.items():  # labels and aliases win over the list
            table.setdefault(phrase.lower(), code)
        return table

    @cached_property
    def _phrase_regex(self) -> re.Pattern[str]:
        # Longest phrases first so "simplified chinese" wins over "chinese".
        phrases = sorted(self._phrase_to_label, key=len, reverse=True)
        return re.compile(r"(?<!\w)(" + "|".join(re.escape(p) for p in phrases) + r")(?!\w)")

    @property
    def free(self) -> bool:
        return self.answer == ANSWER_FREE

    def parse(self, response: str | None) -> ParseResult:
        """Map a free-text answer to a label: a bare label code, or the earliest known phrase. A free
        task's answer has no label: any non-empty one is valid."""
        text = (response or "").strip()
        if not text:
            return ParseResult(label=None, valid=False, reject_reason=REJECT_EMPTY)
        if self.free:
            return ParseResult(label=None, valid=True, reject_reason=None)
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
        """What the student is trained to say for one teacher sample (a free task's: always the response)."""
        if target == "response" or self.free:
            return (self.assistant_prefix + response).strip()
        if label is None:
            raise ValueError("target 'label' needs a parsed label; train on valid rows only")
        return self.labels[label]


def task_for(cfg: Any) -> TaskSpec:
    """The task a pipeline config names (``cfg.task``), with its overrides applied."""
    task = load_task(cfg.name)
    if cfg.student_system_prompt is not None:
        task = task.model_copy(update={"student_system_prompt": cfg.student_system_prompt})
    return task


def load_task(name_or_path: str) -> TaskSpec:
    """Load a built-in task by name (``langid``) or a task YAML by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = BUILTIN_DIR / name_or_path / "task.yaml"
    if not path.is_file():
        builtins = sorted(p.parent.name for p in BUILTIN_DIR.glob("*/task.yaml"))
        raise ConfigError(f"task {name_or_path!r} not found; use a built-in task {builtins} or a path to a task YAML")
    data = _read_task_data(path, seen=())
    try:
        return TaskSpec.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        if first["type"] == "value_error":  # the cross-field checks above: their message names keys and fix
            raise ConfigError(f"task file {str(path)!r}: {first['msg'].removeprefix('Value error, ')}") from None
        key = ".".join(str(p) for p in first["loc"]) or "<root>"
        raise ConfigError(f"task file {str(path)!r}: '{key}': {first['msg']}; fix the task file") from None


def _read_task_data(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    """A task file's keys, with ``*_file`` keys read and ``extends`` (another task file, or a
    built-in task name, whose keys this file overrides) resolved; paths are relative to each file."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        raise ConfigError(f"task file {str(path)!r} is not valid YAML; fix the syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"task file {str(path)!r} must hold a mapping (name, labels, ...)")
    for key in ("system_prompt", "user_template"):
        file_name = data.pop(f"{key}_file", None)
        if file_name is not None:
            data[key] = _task_file(path, f"{key}_file", file_name).read_text().strip()
    aliases_file = data.pop("aliases_file", None)
    if aliases_file is not None:
        data["listed_aliases"] = _read_aliases(_task_file(path, "aliases_file", aliases_file))
    demos_file = data.pop("demonstrations_file", None)
    if demos_file is not None:
        data["demonstrations"] = _read_demonstrations(_task_file(path, "demonstrations_file", demos_file))
    parent = data.pop("extends", None)
    if parent is None:
        return data
    parent_path = path.parent / parent if Path(parent).suffix else BUILTIN_DIR / parent / "task.yaml"
    if not parent_path.is_file() or parent_path.resolve() in seen:
        raise ConfigError(f"task {str(path)!r}: extends {parent!r}, which is not a task file (or extends itself); fix extends")
    return {**_read_task_data(parent_path, (*seen, path.resolve())), **data}


def _task_file(task_path: Path, key: str, name: str) -> Path:
    file_path = task_path.parent / name
    if not file_path.is_file():
        raise ConfigError(f"task {str(task_path)!r}: {key} {str(file_path)!r} not found; fix {key}")
    return file_path


def _read_aliases(path: Path) -> dict[str, str]:
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise ConfigError(f"aliases file {str(path)!r} is not JSON; write one object of phrase -> label") from None
    if not isinstance(table, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in table.items()):
        raise ConfigError(f"aliases file {str(path)!r} must hold one JSON object of phrase -> label (strings)")
    return table


def _read_demonstrations(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise ConfigError(f"demonstrations file {str(path)!r} line {number} is not JSON; one object per line") from None
    return rows
