"""`raydistill train`: teacher samples → Ray Train (DeepSpeed ZeRO + PEFT) → student folders.

    ray job submit --working-dir . -- python -m raydistill train jobs/configs/demo_cpu.yaml

Writes ``<run_dir>/student/{adapter,merged}/``, ``metrics.jsonl``, ``loss_curve.png`` and
``_manifest.json``; checkpoints go to ``<run_dir>/ray_train/train/`` (``--resume`` continues
from the last one after a crash; a failed worker group is restarted from it automatically).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raydistill.config import PipelineConfig
from raydistill.errors import ConfigError, DataError, RunDirError
from raydistill.identity import check_prompts, manifest_prompts, recorded_in_files
from raydistill.manifest import write_manifest
from raydistill.models import check_models_on_nodes, resolve_model
from raydistill.outputs import check_output, staged_output
from raydistill.progress import Progress, last_step
from raydistill.runtime import connect
from raydistill.schema import parquet_files, require_columns
from raydistill.storage import Location, location
from raydistill.student.examples import OPTIONAL_COLUMNS, build_examples_batch, example_columns
from raydistill.student.loop import MLFLOW_EXPERIMENT, train_loop_per_worker
from raydistill.student.loop_config import LoopConfig
from raydistill.student.on_policy_engines import start_engines, stop_engines
from raydistill.student.on_policy_setup import check_tokenizers, write_queries
from raydistill.student.votes import CONFIDENCE, majority_vote, summarize_votes, vote_counts
from raydistill.tasks.pipeline_tasks import run_tasks, specs_by_key, task_factors

logger = logging.getLogger(__name__)


EXAMPLE_BLOCK_ROWS = 4_096  # samples per tokenizing task (~3 s of work at ~0.7 ms a sample)


class ExampleBuilder:
    """Ray Data UDF: tokenizer loaded once per actor, examples built by the pure core."""

    def __init__(self, model_path: str, tasks: dict[str, Any], target: str, max_seq_len: int, val_fraction: float,
                 soft: bool, factors: dict[str, float] | None = None):
        from transformers import AutoTokenizer

        self.kwargs = {
            "tokenizer": AutoTokenizer.from_pretrained(model_path),
            "tasks": tasks,
            "factors": factors,
            "target": target,
            "max_seq_len": max_seq_len,
            "val_fraction": val_fraction,
            "soft": soft,
        }

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return build_examples_batch(batch, **self.kwargs)


def check_samples(samples_dir: str | Path | Location, tasks: list[str], *, soft: bool = False) -> dict[str, int]:
    """Fail early on a missing/foreign samples folder, or a task without valid rows; return the
    number of valid rows per task. Reads the small ``task`` and ``valid`` columns a batch at a
    time (and, with ``soft``, ``token_ids`` until one row has them), so the driver's memory does
    not grow with the samples."""
    samples_dir = location(samples_dir)
    files = parquet_files(samples_dir)
    partial = samples_dir.sibling(f".{samples_dir.name}.partial")
    if not samples_dir.complete() and partial.is_nonempty():
        raise DataError(f"teacher samples in {samples_dir.uri!r} are not complete (generate was interrupted); "
                        f"run `raydistill generate --resume` first")
    if not files:
        raise DataError(f"no teacher samples under {samples_dir.uri!r}; run `raydistill generate` first")
    schema = pq.read_schema(files[0])
    # only what training reads: samples from another tool need not carry generate's bookkeeping
    require_columns(schema.names, example_columns(soft), f"samples in {str(samples_dir)!r}",
                    "regenerate them with `raydistill generate`")
    found: dict[str | None, int] = {}
    if "task" in schema.names:
        for batch in _batches(samples_dir, ["task", "valid"]):
            for r in pa.Table.from_batches([batch]).group_by("task").aggregate([("valid", "sum")]).to_pylist():
                found[r["task"]] = found.get(r["task"], 0) + int(r["valid_sum"] or 0)
    elif len(tasks) > 1:  # samples of one task, from before tasks existed (or from another tool)
        raise DataError(f"samples in {str(samples_dir)!r} have no task column, and the config lists "
                        f"{len(tasks)} tasks; regenerate them with `raydistill generate --overwrite`")
    else:
        found[tasks[0]] = sum(int(pc.sum(b.column(0)).as_py() or 0) for b in _batches(samples_dir, ["valid"]))
    if sum(found.values()) == 0:
        raise DataError(f"samples in {str(samples_dir)!r} hold no valid rows; check the teacher prompt/parser (see the generate manifest)")
    if soft and all(b.column(0).null_count == b.num_rows for b in _batches(samples_dir, ["token_ids"])):
        raise DataError(f"samples in {str(samples_dir)!r} have no teacher logprobs for train.kl_weight; "
                        f"regenerate with teacher.logprobs=5 or set train.kl_weight=0")
    if len(tasks) == 1:  # one task: every row is its (older samples have no task column values)
        return {tasks[0]: sum(found.values())}
    unknown = sorted(str(k) for k in set(found) - set(tasks))
    if unknown:
        raise DataError(f"samples in {str(samples_dir)!r} hold tasks {unknown} that the config does not list; "
                        "regenerate with `raydistill generate --overwrite`")
    empty = [k for k in tasks if not found.get(k)]
    if empty:
        raise DataError(f"task(s) {empty} have no valid teacher samples in {str(samples_dir)!r}; fix their prompt or "
                        "parser (the generate summary lists the rejects) or remove them from tasks")
    return {k: int(found[k]) for k in tasks}


def _batches(samples_dir: Location, columns: list[str]) -> Iterator[Any]:
    """Record batches of some columns of every samples file, one batch in memory at a time."""
    for uri in parquet_files(samples_dir):
        loc = location(uri)
        yield from pq.ParquetFile(loc.path, filesystem=loc.fs).iter_batches(columns=columns, batch_size=65_536)


def check_student_model(model_path: str, cfg: PipelineConfig) -> None:
    """LoRA targets that exist and a sequence length the model can take, checked on the model's
    config and an empty (meta-device) copy, before any worker loads weights."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    context = getattr(config, "max_position_embeddings", None)
    if context and cfg.train.max_seq_len > context:
        raise ConfigError(f"train.max_seq_len={cfg.train.max_seq_len} is longer than the student's context ({context} "
                          f"tokens); lower train.max_seq_len")
    targets = cfg.train.lora_target_modules
    if cfg.train.method != "lora" or targets == ["all-linear"]:
        return
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in leaves]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "Linear"})
        raise ConfigError(f"train.lora_target_modules {missing} not found in {model_path!r}; its linear layers are "
                          f"{linear} (or use ['all-linear'])")


def check_mlflow(tracking_uri: str) -> None:
    """MLflow must import before workers start; a local SQLite store also needs SQLAlchemy and
    Alembic (MLflow 3 refuses plain-folder stores), which ``mlflow-skinny`` alone lacks."""
    needed = ["mlflow"] + (["sqlalchemy", "alembic"] if tracking_uri.startswith("sqlite:") else [])
    import importlib.util

    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"train.tracking=mlflow needs {', '.join(missing)}: pip install 'raydistill[tracking]' "
                          "(or set train.tracking=none)")
    from mlflow.tracking import MlflowClient

    try:  # reach the store now, not in rank 0 after the workers have loaded the model
        client = MlflowClient(tracking_uri)
        if client.get_experiment_by_name(MLFLOW_EXPERIMENT) is None:
            client.create_experiment(MLFLOW_EXPERIMENT)
    except Exception as e:  # noqa: BLE001 - any store error means the same fix
        raise ConfigError(f"train.mlflow_tracking_uri={tracking_uri} is not usable ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200]}); fix the URI or set train.tracking=none") from None


def train_storage(run_dir: Location, *, overwrite: bool, resume: bool) -> Location:
    """Ray Train's run storage (checkpoints): in the run directory, which every node sees (a
    shared mount or object storage, as Ray Train needs on several nodes). Checkpoints of an
    interrupted run are continued with ``resume``, dropped with ``overwrite``, and otherwise refused."""
    storage = run_dir / "ray_train"
    experiment = storage / "train"
    if experiment.is_nonempty():
        if overwrite:
            experiment.delete()
        elif not resume:
            raise RunDirError(f"training checkpoints of an interrupted run are in {experiment.uri!r}; "
                              f"pass --resume to continue from the last one or --overwrite to start over")
    return storage


def plan_steps(n_examples: int, cfg: PipelineConfig) -> dict[str, int]:
    t = cfg.train
    per_step = t.num_workers * t.batch_size_per_worker * t.gradient_accumulation_steps
    # equal shards and drop_last: every worker sees floor(n / workers / batch) micro-batches
    micro_per_worker = (n_examples // t.num_workers) // t.batch_size_per_worker
    steps_per_epoch = micro_per_worker // t.gradient_accumulation_steps
    if steps_per_epoch == 0:
        raise DataError(
            f"{n_examples} training examples are fewer than one step ({per_step} = workers x batch x accumulation); "
            f"label more queries or lower train.batch_size_per_worker"
        )
    total = steps_per_epoch * t.epochs
    if t.max_steps:
        total = min(total, t.max_steps)
    return {"examples": n_examples, "effective_batch": per_step, "steps_per_epoch": steps_per_epoch, "total_steps": total}


def train(cfg: PipelineConfig, *, overwrite: bool = False, resume: bool = False) -> Location:
    """Fine-tune the student on the run's valid samples (Ray Train + DeepSpeed) into ``<run_dir>/student``."""
    started = time.time()
    run_dir = location(cfg.run_dir)
    out_dir = run_dir / "student"
    if resume and out_dir.complete():
        logger.info("train: %s is complete; nothing to resume", out_dir)
        return out_dir
    check_output(out_dir, overwrite=overwrite, what="student directory")
    samples_dir = run_dir / "samples"
    tasks = run_tasks(cfg)
    valid = check_samples(samples_dir, [t.key for t in tasks], soft=cfg.train.kl_weight > 0)
    recorded = manifest_prompts(samples_dir) or recorded_in_files(parquet_files(samples_dir), tasks[0].key)
    check_prompts(recorded, tasks, f"the samples in {samples_dir.uri!r}", allow=cfg.allow_prompt_change)
    n_valid = sum(valid.values())
    factors = task_factors(valid, {t.key: t.weight for t in tasks})
    model_path = resolve_model(cfg.train.student_model)
    check_student_model(model_path, cfg)
    on_policy = cfg.train.on_policy
    models = {cfg.train.student_model: model_path}
    if on_policy.steps:  # the teacher scores the student's tokens: one tokenizer, checked before any work
        models[cfg.teacher.model] = teacher_path = resolve_model(cfg.teacher.model)
        teacher_tokenizer = check_tokenizers(model_path, teacher_path, cfg)
    tracking_uri = None
    if cfg.train.tracking == "mlflow":
        if not cfg.train.mlflow_tracking_uri and run_dir.remote:
            raise ConfigError(f"train.tracking=mlflow keeps a SQLite store in run_dir, which {run_dir.uri!r} cannot hold; "
                              "set train.mlflow_tracking_uri to a tracking server (or train.tracking=none)")
        tracking_uri = cfg.train.mlflow_tracking_uri or f"sqlite:///{run_dir.local_path() / 'mlflow.db'}"
        check_mlflow(tracking_uri)
    connect(cfg)
    check_models_on_nodes(models)
    storage = train_storage(run_dir, overwrite=overwrite, resume=resume)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train_ds, val_ds, n_examples, n_val, votes = example_datasets(cfg, samples_dir, model_path, specs_by_key(tasks),
                                                                  factors)
    plan_sft = plan_steps(n_examples - n_val, cfg)
    log_plan(cfg, plan_sft, votes["kept"] if votes else n_valid, n_examples, n_val)
    sft_steps = plan_sft["total_steps"] if on_policy.warm_start or not on_policy.steps else 0
    plan: dict[str, Any] = {**plan_sft, "total_steps": sft_steps + on_policy.steps, "off_policy_steps": sft_steps,
            "on_policy_steps": on_policy.steps}
    with staged_output(out_dir) as staged:
        engines: dict[str, Any] = {}
        loop_config = LoopConfig(
            train=cfg.train, model_path=model_path, total_steps=plan["total_steps"],
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            export_uri=staged.partial.uri, has_val=n_val > 0, mlflow_tracking_uri=tracking_uri, run_dir=run_dir.uri,
            tasks=[t.key for t in tasks], sft_steps=sft_steps,
        )
        if on_policy.steps:
            queries, plan["on_policy_queries"] = write_queries(
                cfg, _batches(samples_dir, ["id", "query", *(["task"] if len(tasks) > 1 else [])]), staged.partial,
                tokenizer, teacher_tokenizer, specs_by_key(tasks))
            key = hashlib.sha256(staged.partial.uri.encode()).hexdigest()[:12]
            loop_config = loop_config.model_copy(update={"on_policy_queries": queries.uri, "engines_key": key})
        try:
            if on_policy.steps:
                engines = start_engines(cfg, key, model_path, teacher_path, cfg.train.max_seq_len)
            trainer = make_trainer(cfg, loop_config, storage, train_ds, val_ds if n_val else None)
            # rank 0 appends to metrics.jsonl as it goes (in remote run storage, a copy every few seconds)
            with Progress("train", lambda: last_step(staged.partial / "metrics.jsonl"), plan["total_steps"], "steps",
                          every_s=30.0):
                result = trainer.fit()
        finally:
            stop_engines(engines)
        if result.error:
            raise result.error
        tmp = staged.local  # the driver's files, moved into run storage beside rank 0's
        tokenizer.save_pretrained(tmp / "merged")
        if cfg.train.method == "lora":
            tokenizer.save_pretrained(tmp / "adapter")
        counts = {**plan, **finished_counts(staged.partial, tmp), "valid_samples": n_valid, "validation_examples": n_val}
        if votes:
            counts["votes"] = votes
        if len(tasks) > 1:
            counts["tasks"] = {t.key: {"valid_samples": valid[t.key], "factor": round(factors[t.key], 4)} for t in tasks}
        write_manifest(tmp, stage="train", config=cfg.model_dump(),
                       inputs={"samples": samples_dir.uri, "student_model": model_path,
                               "tasks": {t.key: t.spec.name for t in tasks}},
                       counts=counts, started=started,
                       extra={"prompt_sha256": {t.key: t.spec.prompt_sha256 for t in tasks}})
    logger.info("train: wrote %s (loss %s -> %s, eval loss %s)", out_dir, counts["first_loss"], counts["last_loss"],
                counts.get("final_eval_loss"))
    return out_dir


def example_datasets(cfg: PipelineConfig, samples_dir: Location, model_path: str, tasks: dict[str, Any],
                     factors: dict[str, float] | None = None) -> tuple[Any, Any, int, int, dict[str, Any] | None]:
    """Valid samples → tokenized examples (Ray Data), split into train and held-out validation
    by query id; with their counts, and with ``teacher.votes`` how the votes went. Refuses a run
    where no sample fits ``max_seq_len``."""
    import ray
    from ray.data.expressions import col

    samples = ray.data.read_parquet(parquet_files(samples_dir)).select_columns(
        training_columns(samples_dir, cfg.train.kl_weight > 0))
    votes = None
    if cfg.teacher.votes > 1:  # one row per query: its majority label (student/votes.py); a hash shuffle on id
        voted = samples.groupby("id").map_groups(majority_vote, batch_format="pyarrow").materialize()
        counts = voted.map_batches(vote_counts, fn_kwargs={"min_confidence": cfg.train.min_confidence},
                                   batch_format="pyarrow", batch_size=None).take_all()
        votes = summarize_votes(counts, cfg.teacher.votes, cfg.train.min_confidence)
        logger.info("train: %d votes per query: %d queries, mean majority share %.3f, %d unanimous, %d kept "
                    "(train.min_confidence=%s)", cfg.teacher.votes, votes["queries"], votes["mean_confidence"],
                    votes["unanimous"], votes["kept"], cfg.train.min_confidence)
        kept = voted.filter(expr=(col(CONFIDENCE) >= cfg.train.min_confidence) & (col("valid") == True))  # noqa: E712
        samples = kept
    examples = (
        samples
        .filter(expr=col("valid") == True)  # noqa: E712 - an expression, not a Python comparison
        # the Parquet reader coalesces small files into one block, and one block is one task:
        # blocks of a few thousand samples are what lets the builder pool below grow
        .repartition(target_num_rows_per_block=EXAMPLE_BLOCK_ROWS)
        .map_batches(
            ExampleBuilder,
            fn_constructor_kwargs={"model_path": model_path, "tasks": tasks, "factors": factors, "target": cfg.train.target,
                                   "max_seq_len": cfg.train.max_seq_len, "val_fraction": cfg.train.val_fraction,
                                   "soft": cfg.train.kl_weight > 0},
            # ~0.7 ms a sample on one actor: 10^7 samples need a pool (two hours on one actor)
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=tokenizer_actors(cfg.train.tokenizer_actors)),
            num_cpus=0.5,
            batch_size=256,
        )
        .materialize()
    )
    train_ds = examples.filter(expr=col("val") == False)  # noqa: E712
    val_ds = examples.filter(expr=col("val") == True)  # noqa: E712
    n_examples, n_val = examples.count(), val_ds.count()
    if n_examples == 0:
        raise DataError(f"no valid sample fits train.max_seq_len={cfg.train.max_seq_len} tokens; raise train.max_seq_len")
    return train_ds, val_ds, n_examples, n_val, votes


def tokenizer_actors(configured: int | None) -> int:
    """The builder pool's largest size: as configured, else one actor per 8 CPUs of the cluster.
    On 2 cores one actor is as fast as two (the fast tokenizer already uses both; measured) and
    eight were twice as slow, so small machines get one."""
    import ray

    return configured or max(1, int(ray.cluster_resources().get("CPU", 1)) // 8)


def training_columns(samples_dir: Location, soft: bool) -> list[str]:
    """The samples columns training reads (the logprob lists only for soft targets): the rest of
    the samples, often most of their bytes, is never read from disk."""
    present = set(pq.read_schema(parquet_files(samples_dir)[0]).names)
    return [*example_columns(soft), *(c for c in OPTIONAL_COLUMNS if c in present)]


def log_plan(cfg: PipelineConfig, plan: dict[str, int], n_valid: int, n_examples: int, n_val: int) -> None:
    t = cfg.train
    logger.info(
        "train: %d valid samples -> %d examples (%d dropped > max_seq_len=%d), %d held out for eval loss; "
        "effective batch %d; %d steps/epoch; %d steps total; %d workers, ZeRO-%d, %s, %s%s%s",
        n_valid, n_examples, n_valid - n_examples, t.max_seq_len, n_val, plan["effective_batch"],
        plan["steps_per_epoch"], plan["total_steps"], t.num_workers, t.zero_stage, t.method, t.dtype,
        f", KL weight {t.kl_weight}" if t.kl_weight > 0 else "", ", gradient checkpointing" if t.gradient_checkpointing else "",
    )


def make_trainer(cfg: PipelineConfig, loop_config: LoopConfig, storage: Location, train_ds: Any, val_ds: Any | None) -> Any:
    """The Ray Train ``TorchTrainer`` running ``train_loop_per_worker`` on the datasets' shards."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config.to_ray(),
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        # Same name + storage on a re-run: Ray Train restores its checkpoint manager, so
        # get_checkpoint() in the workers returns the last checkpoint of the killed run.
        run_config=RunConfig(
            name="train", storage_path=storage.uri,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
        ),
        datasets={"train": train_ds, "val": val_ds} if val_ds is not None else {"train": train_ds},
    )


def finished_counts(out: Location, local: Path) -> dict[str, Any]:
    """What the workers wrote (summary, metrics), the loss plot (into ``local``), and first/last loss."""
    summary = (out / "train_summary.json").read_json()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    plot_losses(rows, local / "loss_curve.png")
    return {**summary, "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}


def plot_losses(rows: list[dict[str, Any]], path: Path) -> Path:
    """Training loss per logged step and, where measured, the validation loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    train_pts = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    eval_pts = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    if train_pts:
        ax.plot(*zip(*train_pts), label="train loss", color="#4c72b0")
    if eval_pts:
        ax.plot(*zip(*eval_pts), "o-", label="validation loss", color="#dd8452")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (answer tokens)")
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()
    kl_pts = [(r["step"], r["reverse_kl"]) for r in rows if r.get("reverse_kl") is not None]
    if kl_pts:  # on-policy steps: the reverse KL per token on a second axis
        kl_ax = ax.twinx()
        kl_ax.plot(*zip(*kl_pts), label="reverse KL (on-policy batch)", color="#55a868")
        held = [(r["step"] - 1, r["start_eval_reverse_kl"]) for r in rows if r.get("start_eval_reverse_kl") is not None]
        held += [(r["step"], r["eval_reverse_kl"]) for r in rows if r.get("eval_reverse_kl") is not None]
        if held:
            kl_ax.plot(*zip(*held), "s--", label="reverse KL (held-out)", color="#c44e52")
        kl_ax.set_ylabel("reverse KL per token (nats)")
        extra = kl_ax.get_legend_handles_labels()
        handles = (handles[0] + extra[0], handles[1] + extra[1])
    ax.legend(*handles)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

