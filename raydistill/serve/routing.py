"""The request logic of the Serve app, pure: a validated chat request and the public model name it
asks for → what one engine is asked to do. Kept out of the Serve deployment so it can be tested
without Ray or an engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from raydistill.serve.openai_api import ChatCompletionRequest, CompletionRequest, SamplingFields
from raydistill.tasks.pipeline_tasks import RunTask
from raydistill.tasks.task import TaskSpec

DEFAULT_MAX_TOKENS = 64  # chat answers when the client sets no limit (OpenAI: up to the context)
COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass(frozen=True)
class Route:
    """A public model name: which engine answers it, for which task (its prompt, tag and student
    system message), whether the target prompt is injected, and the text its answer is forced to
    start with (prefilled, and returned as part of the answer)."""

    engine: str
    task: TaskSpec
    inject_prompt: bool
    answer_prefix: str = ""


def routes_for(has_student: bool, tasks: list[RunTask], student_prefix: bool = False,
               base_engine: str | None = "teacher") -> dict[str, Route]:
    """Public model names → engines: ``teacher``, ``student`` and ``base``, or with several
    tasks ``teacher/<tag>`` etc., one name per task on the same engines.

    ``student_prefix``: the student was trained to start its answers with the task's prefix.
    ``base_engine``: the engine of the student's starting model, ``teacher`` when the student
    was initialised from the teacher's weights (one engine serves both names), ``base`` for an
    engine of its own, None when it is not served."""
    routes = {}
    for t in tasks:
        spec = t.spec
        routes[t.model_name("teacher")] = Route("teacher", spec, True, spec.assistant_prefix)
        if base_engine is not None:  # the starting model, asked as the student is (bare query, tag)
            routes[t.model_name("base")] = Route(base_engine, spec, False)
        if has_student:
            # a free task's student always learns the whole response, its prefix included
            prefix = spec.assistant_prefix if student_prefix or spec.free else ""
            routes[t.model_name("student")] = Route("student", spec, False, prefix)
    return routes


class RequestError(ValueError):
    """A request the app refuses: an OpenAI error type and HTTP status go with the message."""

    def __init__(self, message: str, kind: str = "invalid_request_error", status: int = 400):
        super().__init__(message)
        self.kind = kind
        self.status = status


@dataclass(frozen=True)
class EngineRequest:
    """One engine call: either a chat to render with the model's template (``messages``) or raw
    texts to continue (``prompts``), the forced answer prefix, and vLLM sampling params."""

    engine: str
    messages: list[dict[str, str]] | None = None
    prompts: list[str] | None = None
    answer_prefix: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    copies: int = 1  # each generation answers this many choices (greedy n > 1: identical choices)


def _route(model: str, routes: dict[str, Route]) -> Route:
    route = routes.get(model)
    if route is None:
        raise RequestError(f"model {model!r} not found; available: {sorted(routes)}", "model_not_found", 404)
    return route


def _sampling(req: SamplingFields, max_tokens: int, logprobs: int | None) -> tuple[dict[str, Any], int]:
    """vLLM sampling params, and how many choices each generation answers. Greedy decoding gives
    n identical choices; vLLM refuses n > 1 when greedy, so it is generated once and copied."""
    copies = req.n if req.temperature == 0 else 1
    params: dict[str, Any] = {"max_tokens": max_tokens, "temperature": req.temperature, "top_p": req.top_p,
                              "n": req.n // copies}
    optional = {"stop": req.stop or None, "seed": req.seed, "logprobs": logprobs,
                "presence_penalty": req.presence_penalty or None, "frequency_penalty": req.frequency_penalty or None}
    params.update({k: v for k, v in optional.items() if v is not None})
    return params, copies


def plan_request(req: ChatCompletionRequest, routes: dict[str, Route]) -> EngineRequest:
    """What the engine behind ``req.model`` is asked to do for a chat request.

    The student and ``base`` see the client's chat as the student was trained on it (the task's
    tag and student system message added); the teacher sees the task's target prompt around the
    last user message, so clients send identical traffic to every model."""
    route = _route(req.model, routes)
    task = route.task
    if route.inject_prompt:
        try:
            messages = task.teacher_messages(req.last_user_text())
        except ValueError:
            raise RequestError("messages hold no user message; the teacher answers the last user message") from None
    else:
        messages = task.with_student_system(req.chat())
    try:
        logprobs = req.num_logprobs()
    except ValueError as exc:
        raise RequestError(str(exc)) from None
    params, copies = _sampling(req, req.limit(DEFAULT_MAX_TOKENS), logprobs)
    return EngineRequest(route.engine, messages=messages, answer_prefix=route.answer_prefix, params=params, copies=copies)


def plan_completion(req: CompletionRequest, routes: dict[str, Route]) -> EngineRequest:
    """A completions request: the raw texts go to the engine as they are (no template, no prefix).
    The teacher's target prompt is a conversation, so the teacher answers chats only."""
    route = _route(req.model, routes)
    if route.inject_prompt:
        raise RequestError(f"model {req.model!r} answers chats only (its target prompt is injected into the "
                           "conversation); use /v1/chat/completions")
    if not req.prompts():
        raise RequestError("prompt is an empty list; send at least one text")
    params, copies = _sampling(req, req.max_tokens or COMPLETIONS_MAX_TOKENS, req.logprobs)
    return EngineRequest(route.engine, prompts=req.prompts(), params=params, copies=copies)
