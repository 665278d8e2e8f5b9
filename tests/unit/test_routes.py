"""The Serve app's request logic (pure): which engine, chat, forced answer prefix and sampling
params each public model name gets."""

import json
from pathlib import Path

import pytest

from raydistill.config import QueriesConfig
from raydistill.serve.openai_api import ChatCompletionRequest, CompletionRequest
from raydistill.serve.routing import (
    COMPLETIONS_MAX_TOKENS,
    DEFAULT_MAX_TOKENS,
    RequestError,
    plan_completion,
    plan_request,
    routes_for,
)
from raydistill.tasks.pipeline_tasks import RunTask
from raydistill.tasks.task import load_task

REPO = Path(__file__).parents[2]
TASK = load_task(str(REPO / "tests" / "data" / "tiny_task.yaml"))  # demonstrations, student system "none"
TASKS = [RunTask(TASK.name, TASK, QueriesConfig(train_path="-", eval_path="-"), None, tagged=False)]


def chat(model: str, *messages: tuple[str, str], **extra) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": model, "messages": [{"role": r, "content": c} for r, c in messages], **extra})


def test_teacher_gets_the_prompt_and_prefix_base_gets_neither():
    routes = routes_for(False, TASKS)
    assert set(routes) == {"teacher", "base"}
    assert routes["teacher"].engine == routes["base"].engine == "teacher"
    assert routes["teacher"].inject_prompt and routes["teacher"].answer_prefix == "This text is written in"
    assert not routes["base"].inject_prompt and routes["base"].answer_prefix == ""


def test_student_gets_the_prefix_only_when_trained_to_say_it():
    trained_on_response = routes_for(True, TASKS, student_prefix=True)["student"]
    trained_on_label = routes_for(True, TASKS, student_prefix=False)["student"]
    assert trained_on_response.engine == "student" and not trained_on_response.inject_prompt
    assert trained_on_response.answer_prefix == TASK.assistant_prefix
    assert trained_on_label.answer_prefix == ""


def test_teacher_request_wraps_the_last_user_message_in_the_target_prompt():
    routes = routes_for(True, TASKS, student_prefix=True)
    plan = plan_request(chat("teacher", ("user", "ignored"), ("assistant", "x"), ("user", "Hola mundo")), routes)
    assert plan.engine == "teacher" and plan.messages == TASK.teacher_messages("Hola mundo")
    assert plan.answer_prefix == TASK.assistant_prefix


def test_student_request_is_the_clients_chat_with_the_trained_system_message():
    routes = routes_for(True, TASKS, student_prefix=True)
    plan = plan_request(chat("student", ("user", "Hola mundo")), routes)
    assert plan.engine == "student"
    assert plan.messages == [{"role": "system", "content": ""}, {"role": "user", "content": "Hola mundo"}]
    own_system = plan_request(chat("student", ("system", "Be brief."), ("user", "Hola")), routes)
    assert own_system.messages[0] == {"role": "system", "content": "Be brief."}  # the client's wins


def test_sampling_params_follow_the_request_with_openais_defaults():
    routes = routes_for(True, TASKS)
    plain = plan_request(chat("base", ("user", "x")), routes).params
    assert plain == {"max_tokens": DEFAULT_MAX_TOKENS, "temperature": 1.0, "top_p": 1.0, "n": 1}
    asked = plan_request(chat("base", ("user", "x"), max_tokens=5, max_completion_tokens=3, stop=["."], seed=7,
                              temperature=0.5, n=2, logprobs=True, top_logprobs=3, presence_penalty=0.5), routes).params
    assert asked == {"max_tokens": 3, "temperature": 0.5, "top_p": 1.0, "n": 2, "stop": ["."], "seed": 7,
                     "logprobs": 3, "presence_penalty": 0.5}
    chosen_only = plan_request(chat("base", ("user", "x"), logprobs=True), routes).params
    assert chosen_only["logprobs"] == 0  # logprobs without top_logprobs: the chosen token's alone
    with pytest.raises(RequestError, match="top_logprobs needs logprobs: true"):
        plan_request(chat("base", ("user", "x"), top_logprobs=2), routes)


def test_greedy_n_is_one_generation_answering_n_identical_choices():
    routes = routes_for(True, TASKS)
    greedy = plan_request(chat("base", ("user", "x"), n=3, temperature=0), routes)
    assert greedy.params["n"] == 1 and greedy.copies == 3  # vLLM refuses n > 1 when greedy
    sampled = plan_request(chat("base", ("user", "x"), n=3, temperature=0.7), routes)
    assert sampled.params["n"] == 3 and sampled.copies == 1


def test_developer_role_and_text_parts_reach_the_student_as_a_plain_chat():
    routes = routes_for(True, TASKS)
    req = ChatCompletionRequest.model_validate({"model": "student", "messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hola "}, {"type": "text", "text": "mundo"}]}]})
    assert plan_request(req, routes).messages == [{"role": "system", "content": "Be brief."},
                                                        {"role": "user", "content": "Hola mundo"}]
    teacher = plan_request(req.model_copy(update={"model": "teacher"}), routes)
    assert teacher.messages == TASK.teacher_messages("Hola mundo")


def test_completions_continue_raw_text_and_the_teacher_answers_chats_only():
    routes = routes_for(True, TASKS, student_prefix=True)
    req = CompletionRequest.model_validate({"model": "student", "prompt": ["a", "b"], "logprobs": 2})
    plan = plan_completion(req, routes)
    assert plan.engine == "student" and plan.prompts == ["a", "b"] and plan.messages is None
    assert plan.answer_prefix == "" and plan.params["max_tokens"] == COMPLETIONS_MAX_TOKENS and plan.params["logprobs"] == 2
    with pytest.raises(RequestError, match="answers chats only.*/v1/chat/completions"):
        plan_completion(req.model_copy(update={"model": "teacher"}), routes)
    with pytest.raises(RequestError, match="empty list"):
        plan_completion(req.model_copy(update={"prompt": []}), routes)


def test_base_is_the_students_starting_model():
    assert routes_for(True, TASKS)["base"].engine == "teacher"  # student initialised from the teacher's weights
    assert routes_for(True, TASKS, base_engine="base")["base"].engine == "base"
    assert "base" not in routes_for(True, TASKS, base_engine=None)


def test_unknown_model_and_teacher_without_user_message_are_refused():
    routes = routes_for(False, TASKS)
    with pytest.raises(RequestError, match="'student' not found; available: \\['base', 'teacher'\\]") as missing:
        plan_request(chat("student", ("user", "x")), routes)
    assert missing.value.status == 404 and missing.value.kind == "model_not_found"
    with pytest.raises(RequestError, match="no user message") as no_user:
        plan_request(chat("teacher", ("system", "x")), routes)
    assert no_user.value.status == 400


def test_the_students_trained_target_comes_from_its_manifest(tmp_path):
    from raydistill.config import load_config
    from raydistill.serve.stage import trained_target

    cfg = load_config(REPO / "jobs" / "configs" / "demo_cpu.yaml", [f"run_dir={tmp_path}", "train.target=response"])
    assert trained_target(cfg) == "response"  # no student yet: what the config asks for
    (tmp_path / "student").mkdir()
    (tmp_path / "student" / "_manifest.json").write_text(json.dumps({"config": {"train": {"target": "label"}}}))
    assert trained_target(cfg) == "label"  # what it was actually trained with wins
