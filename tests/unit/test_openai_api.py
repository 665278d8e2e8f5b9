"""The OpenAI request models and response bodies (pure): what is accepted, what is refused and
how, and the shapes OpenAI SDKs parse (checked with the SDK's own response types)."""

import asyncio
import json
from dataclasses import dataclass

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import ValidationError

from raydistill.serve.openai_api import (
    ChatCompletionRequest,
    ChunkWriter,
    CompletionRequest,
    chat_completion_body,
    completion_body,
    engine_logprobs,
    sse,
    stream_events,
    validation_message,
)


def refused(model, payload) -> str:
    with pytest.raises(ValidationError) as exc:
        model.model_validate(payload)
    return validation_message(exc.value)


def user(content) -> dict:
    return {"model": "student", "messages": [{"role": "user", "content": content}]}


def test_defaults_are_openais():
    req = ChatCompletionRequest.model_validate(user("x"))
    assert (req.temperature, req.top_p, req.n, req.stream, req.num_logprobs()) == (1.0, 1.0, 1, False, None)


def test_unknown_fields_are_refused_by_name():
    message = refused(ChatCompletionRequest, {**user("x"), "tools": [{"type": "function"}]})
    assert message.startswith("unsupported field 'tools'") and "\n" not in message
    assert refused(CompletionRequest, {"model": "m", "prompt": "x", "suffix": "y"}).startswith("unsupported field 'suffix'")
    # metadata that does not change the answer is accepted
    ChatCompletionRequest.model_validate({**user("x"), "user": "u-1", "metadata": {"k": "v"}, "store": False})


def test_content_parts_other_than_text_are_refused_by_type():
    message = refused(ChatCompletionRequest, user([{"type": "text", "text": "a"},
                                                   {"type": "image_url", "image_url": {"url": "u"}}]))
    assert message == ("invalid request: messages.0.content: content part type 'image_url' is not supported; "
                       "this server takes text parts only")


@pytest.mark.parametrize(("field", "value"), [("n", 0), ("n", 17), ("top_logprobs", 21), ("temperature", 3)])
def test_out_of_range_values_name_the_field(field, value):
    assert refused(ChatCompletionRequest, {**user("x"), field: value}).startswith(f"invalid request: {field}: ")


@dataclass
class Lp:  # vLLM's Logprob, as far as we read it
    logprob: float
    rank: int
    decoded_token: str


def test_engine_logprobs_keep_the_top_k_and_the_chosen_token():
    # token 7 was sampled at rank 3: vLLM sends the top 2 plus the chosen one
    step = {5: Lp(-0.1, 1, "Hi"), 6: Lp(-2.0, 2, "Hey"), 7: Lp(-3.0, 3, "Yo")}
    assert engine_logprobs([7], [step], 2) == [{"token": "Yo", "logprob": -3.0, "top": [["Hi", -0.1], ["Hey", -2.0]]}]
    assert engine_logprobs([5], [{5: Lp(-0.1, 1, "Hi")}], 0) == [{"token": "Hi", "logprob": -0.1, "top": []}]


CHOICES = [{"index": i, "text": f"answer {i}", "finish_reason": "length", "completion_tokens": 2,
            "logprobs": [{"token": "answer", "logprob": -0.5, "top": [["answer", -0.5]]},
                         {"token": f" {i}", "logprob": -1.0, "top": [[f" {i}", -1.0]]}]} for i in range(2)]


def test_chat_body_parses_as_the_sdks_chat_completion():
    body = ChatCompletion.model_validate(chat_completion_body("student", CHOICES, 11, with_logprobs=True))
    assert [c.message.content for c in body.choices] == ["answer 0", "answer 1"]
    assert body.usage.total_tokens == 15 and body.choices[1].logprobs.content[1].token == " 1"
    assert body.choices[0].logprobs.content[0].bytes == list(b"answer")
    plain = ChatCompletion.model_validate(chat_completion_body("student", CHOICES[:1], 11, with_logprobs=False))
    assert plain.choices[0].logprobs is None


def test_completion_body_parses_as_the_sdks_completion_with_text_offsets():
    body = Completion.model_validate(completion_body("base", CHOICES, 4, with_logprobs=True))
    assert body.choices[0].logprobs.tokens == ["answer", " 0"]
    assert body.choices[0].logprobs.text_offset == [0, 6] and body.choices[0].logprobs.top_logprobs[1] == {" 0": -1.0}


def test_stream_chunks_share_an_id_and_end_with_usage():
    writer = ChunkWriter("teacher", chat=True)
    first = ChatCompletionChunk.model_validate(writer.delta(0, "This text is written in", role=True))
    later = ChatCompletionChunk.model_validate(writer.delta(0, " French", "stop", logprobs=CHOICES[0]["logprobs"]))
    assert first.id == later.id and first.choices[0].delta.role == "assistant"
    assert later.choices[0].delta.content == " French" and later.choices[0].finish_reason == "stop"
    last = ChatCompletionChunk.model_validate(writer.usage(30, 3))
    assert last.choices == [] and last.usage.completion_tokens == 3
    # (the SDK's Completion type wants a finish reason; mid-stream chunks carry null, as OpenAI's do)
    text = Completion.model_validate(ChunkWriter("base", chat=False).delta(1, " there", "length", text_offset=5,
                                                                            logprobs=CHOICES[0]["logprobs"]))
    assert text.choices[0].index == 1 and text.choices[0].logprobs.text_offset == [5, 11]


def test_server_sent_events_are_data_lines():
    assert sse("[DONE]") == "data: [DONE]\n\n"
    event = sse({"a": "é"})
    assert event.startswith("data: ") and event.endswith("\n\n") and json.loads(event[6:]) == {"a": "é"}


def collect(deltas, *, chat=True, n=1, include_usage=False, on_error=lambda exc: (503, "restarting; retry")):
    async def run():
        return [e async for e in stream_events(deltas, ChunkWriter("student", chat), choices=n, prompt_tokens=30,
                                               answer_prefix="This text is written in", include_usage=include_usage,
                                               on_error=on_error)]
    events = asyncio.run(run())
    assert all(e.startswith("data: ") and e.endswith("\n\n") for e in events)
    return [e[6:-2] if e[6:-2] == "[DONE]" else json.loads(e[6:-2]) for e in events]


def delta(index, text, finish=None):
    return {"index": index, "text": text, "finish_reason": finish, "completion_tokens": 1, "logprobs": None}


async def engine(*items):
    """An engine's delta stream: dicts are yielded, an exception is raised where it stands."""
    for item in items:
        if isinstance(item, BaseException):
            raise item
        yield item


def test_a_stream_opens_each_choice_with_the_prefix_and_ends_with_usage_then_done():
    events = collect(engine(delta(0, " French"), delta(1, " Greek"), delta(0, ".", "stop"), delta(1, ".", "stop")),
                     n=2, include_usage=True)
    chunks = [ChatCompletionChunk.model_validate(e) for e in events[:-1]]
    assert [(c.choices[0].index, c.choices[0].delta.role) for c in chunks[:2]] == [(0, "assistant"), (1, "assistant")]
    text = {i: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
            for i in (0, 1)}
    assert text == {0: "This text is written in French.", 1: "This text is written in Greek."}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4 and chunks[-1].usage.prompt_tokens == 30
    assert events[-1] == "[DONE]"


def test_an_engine_failing_mid_stream_ends_the_stream_with_one_error_event_then_done():
    seen = []

    def on_error(exc):
        seen.append(exc)
        return 503, "model 'student' is restarting after an engine failure; retry the request shortly"

    boom = RuntimeError("EngineDeadError at ray::ServeReplica pid=1234")
    events = collect(engine(delta(0, " Fre"), boom, delta(0, "nch")), include_usage=True, on_error=on_error)
    assert seen == [boom]
    assert ChatCompletionChunk.model_validate(events[1]).choices[0].delta.content == " Fre"  # delivered before it failed
    assert events[2] == {"error": {"message": "model 'student' is restarting after an engine failure; retry the "
                                              "request shortly", "type": "server_error", "code": 503}}
    assert events[3:] == ["[DONE]"]  # no usage chunk and nothing after the failure
    assert "pid" not in json.dumps(events[2]) and "ray::" not in json.dumps(events[2])


def test_a_completion_stream_tracks_text_offsets_per_choice():
    events = collect(engine(delta(0, "ab"), delta(0, "cd", "stop")), chat=False)
    assert [e["choices"][0]["text"] for e in events[:-1]] == ["ab", "cd"]  # no role chunk, no prefix
    assert events[-1] == "[DONE]"


def test_engine_failures_are_503_for_a_dead_replica_and_500_otherwise_naming_no_internals():
    from ray.exceptions import RayActorError

    from raydistill.serve.app import engine_failure

    status, message = engine_failure(RayActorError(error_msg="ray::ServeReplica died pid=99"), "student")
    assert status == 503 and "retry" in message and "pid" not in message and "ray::" not in message
    status, message = engine_failure(ValueError("secret internals"), "teacher")
    assert status == 500 and "ValueError" in message and "secret" not in message
