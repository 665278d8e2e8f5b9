"""The request logic of the Serve app, pure: a validated chat request and the public model name it
asks for → what one engine is asked to do. Kept out of the Serve deployment so it can be tested
without Ray or an engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from raydistill.serve.openai_api import ChatCompletionRequest
from raydistill.tasks.task import TaskSpec

DEFAULT_MAX_TOKENS = 64


@dataclass(frozen=True)
class Route:
    """A public model name: which engine answers it, whether the target prompt is injected, and
    the text its answer is forced to start with (prefilled, and returned as part of the answer)."""

    engine: str
    inject_prompt: bool
    answer_prefix: str = ""


def routes_for(has_student: bool, task: TaskSpec, student_prefix: bool = False) -> dict[str, Route]:
    """Public model names → engines. ``teacher`` and ``base`` share the teacher's engine.
    ``student_prefix``: the student was trained to start its answers with the task's prefix."""
    routes = {"teacher": Route("teacher", True, task.assistant_prefix), "base": Route("teacher", False)}
    if has_student:
        routes["student"] = Route("student", False, task.assistant_prefix if student_prefix else "")
    return routes


class RequestError(ValueError):
    """A request the app refuses: an OpenAI error type and HTTP status go with the message."""

    def __init__(self, message: str, kind: str = "invalid_request_error", status: int = 400):
        super().__init__(message)
        self.kind = kind
        self.status = status


@dataclass(frozen=True)
class EngineRequest:
    """One generation: the chat to render, the forced answer prefix, and vLLM sampling params."""

    engine: str
    messages: list[dict[str, str]]
    answer_prefix: str
    params: dict[str, Any] = field(default_factory=dict)


def plan_request(req: ChatCompletionRequest, routes: dict[str, Route], task: TaskSpec) -> EngineRequest:
    """What the engine behind ``req.model`` is asked to do.

    The student and ``base`` see the client's chat as the student was trained on it (the task's
    student system message added unless the client sent one); the teacher sees the target prompt
    around the last user message, so clients send identical traffic to every model."""
    route = routes.get(req.model)
    if route is None:
        raise RequestError(f"model {req.model!r} not found; available: {sorted(routes)}", "model_not_found", 404)
    if route.inject_prompt:
        try:
            messages = task.teacher_messages(req.last_user_text())
        except ValueError:
            raise RequestError("messages hold no user message; the teacher answers the last user message") from None
    else:
        messages = task.with_student_system([m.model_dump() for m in req.messages])
    params: dict[str, Any] = {"max_tokens": req.limit(DEFAULT_MAX_TOKENS), "temperature": req.temperature, "top_p": req.top_p}
    if req.stop:
        params["stop"] = req.stop
    if req.seed is not None:
        params["seed"] = req.seed
    return EngineRequest(route.engine, messages, route.answer_prefix, params)
