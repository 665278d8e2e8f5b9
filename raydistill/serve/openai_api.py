"""Pure pieces of the OpenAI-compatible API: request models, response, stream-chunk and error bodies.

The request models follow OpenAI's chat-completions and completions APIs for text generation:
OpenAI's defaults (``temperature`` 1, ``top_p`` 1, ``n`` 1), content given as a string or as text
parts, the ``developer`` role, ``stream`` with ``stream_options.include_usage``, ``logprobs``.
A field outside that surface (tools, images, response formats, ...) is refused with a 400 that
names it, rather than dropped: a client relying on it would otherwise get a silently different
answer."""

from __future__ import annotations

import json
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_N = 16  # choices per request: each is a full generation on the engine
MAX_TOP_LOGPROBS = 20  # OpenAI's bound, and vLLM's default max_logprobs

# Accepted and ignored: request metadata that does not change the answer.
METADATA_FIELDS = ("user", "metadata", "store", "service_tier")


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value: Any) -> Any:
        if isinstance(value, list):
            other = sorted({str(p.get("type")) for p in value if isinstance(p, dict) and p.get("type") != "text"})
            if other:
                raise ValueError(f"content part type {', '.join(repr(t) for t in other)} is not supported; "
                                 "this server takes text parts only")
        return value

    def text(self) -> str:
        """The content as one string: text parts joined in order (as OpenAI concatenates them)."""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def as_chat(self) -> dict[str, str]:
        """For the chat template: ``developer`` is OpenAI's new name for ``system``."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


class StreamOptions(_Request):
    include_usage: bool = False


class SamplingFields(_Request):
    """Fields both endpoints share, with OpenAI's defaults."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(SamplingFields):
    """An OpenAI chat-completions request, text generation only."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    def limit(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default

    def num_logprobs(self) -> int | None:
        """vLLM's ``logprobs``: how many alternatives per token (0: the chosen token only)."""
        if not self.logprobs:
            if self.top_logprobs:
                raise ValueError("top_logprobs needs logprobs: true")
            return None
        return self.top_logprobs or 0

    def chat(self) -> list[dict[str, str]]:
        return [m.as_chat() for m in self.messages]

    def last_user_text(self) -> str:
        for message in reversed(self.messages):
            if message.role == "user":
                return message.text()
        raise ValueError("no user message")


class CompletionRequest(SamplingFields):
    """An OpenAI (legacy) completions request: raw text continued, no chat template."""

    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=5)  # OpenAI's bound for this endpoint

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


def validation_message(exc: ValidationError) -> str:
    """One line for the client from pydantic's first error; an unknown field is named as such."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"
    if first["type"] == "extra_forbidden":
        return (f"unsupported field {where!r}: this server does text generation only and refuses fields it would "
                "otherwise ignore; remove it")
    message = str(first["msg"]).removeprefix("Value error, ")
    return f"invalid request: {where}: {message}"


def error_body(message: str, kind: str, code: int) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def engine_logprobs(token_ids: Any, logprobs: Any, k: int) -> list[dict[str, Any]]:
    """Per generated token, from vLLM's logprobs (one ``{token_id: Logprob}`` per token, holding
    the top ``k`` and the chosen token): ``{"token", "logprob", "top": [[token, logprob], ...]}``
    with the ``k`` most likely alternatives, most likely first. Plain values, so they cross Ray."""
    tokens = []
    for token_id, alternatives in zip(token_ids, logprobs or [], strict=False):
        chosen = alternatives[token_id]
        ranked = sorted(alternatives.values(), key=lambda lp: lp.rank if lp.rank is not None else 1 << 30)
        tokens.append({"token": chosen.decoded_token or "", "logprob": float(chosen.logprob),
                       "top": [[lp.decoded_token or "", float(lp.logprob)] for lp in ranked[:k]]})
    return tokens


def chat_logprobs(tokens: list[dict[str, Any]]) -> dict[str, Any]:
    """OpenAI's chat ``logprobs`` object from the engine's per-token entries
    (``{"token", "logprob", "top": [[token, logprob], ...]}``)."""
    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [{**entry(t["token"], t["logprob"]), "top_logprobs": [entry(tok, lp) for tok, lp in t["top"]]}
                        for t in tokens], "refusal": None}


def completion_logprobs(tokens: list[dict[str, Any]], start: int = 0) -> dict[str, Any]:
    """The completions endpoint's ``logprobs`` object; ``start`` is the text offset of the first token."""
    offsets, at = [], start
    for t in tokens:
        offsets.append(at)
        at += len(t["token"])
    return {"tokens": [t["token"] for t in tokens], "token_logprobs": [t["logprob"] for t in tokens],
            "top_logprobs": [dict(t["top"]) for t in tokens], "text_offset": offsets}


def chat_completion_body(model: str, choices: list[dict[str, Any]], prompt_tokens: int, *, with_logprobs: bool) -> dict[str, Any]:
    """``choices``: the engine's, each ``{"index", "text", "finish_reason", "completion_tokens", "logprobs"}``."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": c["index"], "message": {"role": "assistant", "content": c["text"]},
             "logprobs": chat_logprobs(c["logprobs"]) if with_logprobs else None,
             "finish_reason": c["finish_reason"] or "stop"}
            for c in choices
        ],
        "usage": usage(prompt_tokens, sum(c["completion_tokens"] for c in choices)),
    }


def completion_body(model: str, choices: list[dict[str, Any]], prompt_tokens: int, *, with_logprobs: bool) -> dict[str, Any]:
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": c["index"], "text": c["text"],
             "logprobs": completion_logprobs(c["logprobs"]) if with_logprobs else None,
             "finish_reason": c["finish_reason"] or "stop"}
            for c in choices
        ],
        "usage": usage(prompt_tokens, sum(c["completion_tokens"] for c in choices)),
    }


class ChunkWriter:
    """Server-sent events for one streamed request: every chunk shares the id, creation time and model."""

    def __init__(self, model: str, chat: bool):
        self.chat = chat
        self.head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                     "object": "chat.completion.chunk" if chat else "text_completion",
                     "created": int(time.time()), "model": model}

    def delta(self, index: int, text: str, finish_reason: str | None = None, *, role: bool = False,
              logprobs: list[dict[str, Any]] | None = None, text_offset: int = 0) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if role else {"content": text}
            choice: dict[str, Any] = {"index": index, "delta": delta,
                                      "logprobs": chat_logprobs(logprobs) if logprobs is not None else None}
        else:
            choice = {"index": index, "text": text,
                      "logprobs": completion_logprobs(logprobs, text_offset) if logprobs is not None else None}
        choice["finish_reason"] = finish_reason
        return {**self.head, "choices": [choice]}

    def usage(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        """The last chunk when ``stream_options.include_usage``: no choices, the request's usage."""
        return {**self.head, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def stream_events(
    deltas: AsyncIterator[dict[str, Any]], writer: ChunkWriter, *, choices: int, prompt_tokens: int,
    answer_prefix: str = "", include_usage: bool = False,
    on_error: Callable[[BaseException], tuple[int, str]],
) -> AsyncIterator[str]:
    """The server-sent events of one streamed answer, from the engine's deltas (``index``, ``text``,
    ``finish_reason``, ``completion_tokens``, ``logprobs``) to ``[DONE]``.

    The HTTP status is sent before the first delta, so an engine that fails mid-stream cannot turn
    the response into a 5xx: the failure becomes one OpenAI error event (``on_error`` gives its
    status and one-line message) and the stream still ends with ``[DONE]``, which is what the SDKs
    wait for. For chat, each choice opens with the role and the forced answer prefix.
    """
    tokens, offsets = 0, defaultdict[int, int](int)
    try:
        if writer.chat:
            for index in range(choices):
                yield sse(writer.delta(index, answer_prefix, role=True))
        async for d in deltas:
            tokens += d["completion_tokens"]
            yield sse(writer.delta(d["index"], d["text"], d["finish_reason"], logprobs=d["logprobs"],
                                   text_offset=offsets[d["index"]]))
            offsets[d["index"]] += len(d["text"])
        if include_usage:
            yield sse(writer.usage(prompt_tokens, tokens))
    except Exception as exc:  # noqa: BLE001 - headers are sent: the error goes in the stream
        status, message = on_error(exc)
        yield sse(error_body(message, "server_error", status))
    yield sse("[DONE]")


def models_body(names: list[str]) -> dict[str, Any]:
    now = int(time.time())
    return {"object": "list", "data": [{"id": n, "object": "model", "created": now, "owned_by": "raydistill"} for n in names]}
