"""The on-policy phase of the training loop (``train.on_policy.steps`` after the off-policy ones).

Each step, on every worker: send the adapter to the rollout engine when it is due (rank 0, then a
barrier), sample answers to this worker's queries of the step, have the prompted teacher score
their tokens, and take one optimizer step on the reverse KL (``on_policy.reverse_kl_loss``).
Which queries a step uses and their sampling seeds follow from the step number alone, so a run
resumed from a checkpoint repeats no step and skips none. Rows go to ``metrics.jsonl`` with the
time of each phase (rollout, scoring, update, adapter sync).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from raydistill.student.examples import IGNORE_INDEX, collate
from raydistill.student.on_policy import QueryPrompts, teacher_view

logger = logging.getLogger(__name__)

QUERY_COLUMNS = ("id", "task", "split", "student_ids", "teacher_ids", "prefix_ids", "student_has_prefix")


@dataclasses.dataclass
class Answer:
    """One sampled student answer with everything its loss needs."""

    input_ids: list[int]  # student prompt + answer
    prompt_len: int
    rollout_logprobs: list[float]
    teacher_logprobs: list[float]
    top_ids: list[list[int]] = dataclasses.field(default_factory=list)  # with teacher_topk: per answer token
    top_logprobs: list[list[float]] = dataclasses.field(default_factory=list)


def prompts_of(row: dict[str, Any]) -> QueryPrompts:
    return QueryPrompts(student=list(row["student_ids"]), teacher=list(row["teacher_ids"]),
                        prefix=list(row["prefix_ids"]), student_has_prefix=bool(row["student_has_prefix"]))


def load_queries(uri: str, rank: int, world: int) -> tuple[list[QueryPrompts], list[QueryPrompts]]:
    """This rank's training and held-out prompts from the driver's query file (run storage)."""
    import pyarrow.parquet as pq

    from raydistill.storage import Location

    loc = Location(uri)
    rows = pq.read_table(loc.path, filesystem=loc.fs, columns=list(QUERY_COLUMNS)).to_pylist()
    train = [prompts_of(r) for r in rows if r["split"] == "train"]
    held_out = [prompts_of(r) for r in rows if r["split"] == "eval"]
    return train[rank::world], held_out[rank::world]


def seed_of(*parts: int) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:4], "little") & 0x7FFFFFFF


def step_queries(prompts: list[QueryPrompts], op_step: int, per_step: int, seed: int) -> list[QueryPrompts]:
    """The queries of on-policy step ``op_step``: consecutive slices of one seeded permutation,
    wrapping around when the step count needs more queries than the worker holds."""
    order = np.random.default_rng(seed).permutation(len(prompts))
    return [prompts[order[(op_step * per_step + j) % len(prompts)]] for j in range(per_step)]


def rollout_and_score(engines: dict[str, Any], prompts: list[QueryPrompts], seeds: list[int], op: Any,
                      times: dict[str, float]) -> list[Answer]:
    """Sample ``op.samples_per_query`` answers per prompt on the rollout engine, then score their
    tokens with the prompted teacher; adds each phase's seconds to ``times`` (and the tokens the
    teacher read to ``times["teacher_tokens"]``)."""
    import ray

    started = time.time()
    samples = ray.get(engines["rollout"].generate.remote([p.student for p in prompts], seeds, op.samples_per_query,
                                                         op.max_tokens, op.temperature))
    times["rollout_s"] += time.time() - started
    pairs = [(p, s) for p, per_prompt in zip(prompts, samples) for s in per_prompt if s["token_ids"]]
    views = [teacher_view(p, s["token_ids"]) for p, s in pairs]
    started = time.time()
    forced = [s["token_ids"][: v[2]] for (_, s), v in zip(pairs, views)]
    teacher = ray.get(engines["scorer"].score.remote([v[0] for v in views], [v[1] for v in views], forced,
                                                     op.teacher_topk))
    times["score_s"] += time.time() - started
    times["teacher_tokens"] = times.get("teacher_tokens", 0) + sum(len(v[0]) for v in views)  # the scoring's cost
    return [Answer(input_ids=p.student + s["token_ids"], prompt_len=len(p.student), rollout_logprobs=s["logprobs"],
                   teacher_logprobs=t["logprobs"], top_ids=t.get("top_ids", []), top_logprobs=t.get("top_logprobs", []))
            for (p, s), t in zip(pairs, teacher)]


def student_logprobs(model: Any, answers: list[Answer], pad_id: int, device: Any, full: bool = False) -> Any:
    """The student's log-prob of each answer token (a flat tensor, answers in order), computing the
    vocabulary head at answer positions only (as ``loss.answer_only_loss``); with ``full``, also
    the whole log-softmax at those positions ([tokens, vocabulary])."""
    import torch
    import torch.nn.functional as F

    from raydistill.student.loss import causal_lm_of
    from raydistill.student.step import to_device

    batch = {"input_ids": np.array([a.input_ids for a in answers] + [None], dtype=object)[:-1],
             "labels": np.array([[IGNORE_INDEX] * a.prompt_len + a.input_ids[a.prompt_len:] for a in answers] + [None],
                                dtype=object)[:-1]}
    arrays = to_device(collate(batch, pad_id), device)
    lm = causal_lm_of(model)
    hidden = lm.get_decoder()(input_ids=arrays["input_ids"], attention_mask=arrays["attention_mask"]).last_hidden_state
    targets = arrays["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    logits = lm.get_output_embeddings()(hidden[:, :-1][keep]).float()
    dist = F.log_softmax(logits, dim=-1)
    sampled = dist.gather(-1, targets[keep].unsqueeze(-1)).squeeze(-1).to(torch.float32)
    return (sampled, dist) if full else sampled


def padded_top(answers: list[Answer], device: Any) -> tuple[Any, Any, Any]:
    """The teacher's top tokens per answer token as [tokens, k] ids, log-probs and mask."""
    import torch

    rows = [(i, lp) for a in answers for i, lp in zip(a.top_ids, a.top_logprobs)]
    k = max(len(i) for i, _ in rows)
    ids = torch.zeros((len(rows), k), dtype=torch.long)
    lps = torch.zeros((len(rows), k), dtype=torch.float32)
    mask = torch.zeros((len(rows), k), dtype=torch.bool)
    for r, (i, lp) in enumerate(rows):
        ids[r, : len(i)] = torch.tensor(i)
        lps[r, : len(lp)] = torch.tensor(lp)
        mask[r, : len(i)] = True
    return ids.to(device), lps.to(device), mask.to(device)


def flat(answers: list[Answer], field: str, device: Any) -> Any:
    import torch

    return torch.tensor([x for a in answers for x in getattr(a, field)], dtype=torch.float32, device=device)


def update(engine: Any, answers: list[Answer], pad_id: int, accumulation: int, clip: float,
           topk: int = 0) -> tuple[float, float, float, int]:
    """One optimizer step on the answers (split into DeepSpeed's ``accumulation`` micro-batches,
    each weighted by its share of the tokens): (loss, mean reverse KL of the sampled tokens, mean
    log-prob gap to the rollout engine, answer tokens). With ``topk``, the loss is the dense
    reverse KL over the teacher's top tokens (``on_policy.topk_reverse_kl``)."""
    from raydistill.student.on_policy import reverse_kl_loss, topk_reverse_kl

    parts = [list(p) for p in np.array_split(np.array(answers, dtype=object), accumulation)]
    counts = [sum(len(a.teacher_logprobs) for a in p) for p in parts]
    total = max(1, sum(counts))
    loss_sum, kl_sum, gap_sum = 0.0, 0.0, 0.0
    for part, n in zip(parts, counts):
        lp, dist = student_logprobs(engine.module, part, pad_id, engine.device, full=True)
        loss, kl, gap = reverse_kl_loss(lp, flat(part, "rollout_logprobs", engine.device),
                                        flat(part, "teacher_logprobs", engine.device), clip)
        if topk:
            loss = topk_reverse_kl(dist, *padded_top(part, engine.device))
        engine.backward(loss * (accumulation * n / total))
        engine.step()
        loss_sum += float(loss.detach()) * n
        kl_sum += float(kl) * n
        gap_sum += float(gap) * n
    return loss_sum / total, kl_sum / total, gap_sum / total, total


def held_out_reverse_kl(engine: Any, engines: dict[str, Any], prompts: list[QueryPrompts], op: Any, seed: int,
                        rank: int, pad_id: int) -> float | None:
    """Per-token reverse KL on the fixed held-out queries, summed over every rank's share: one
    sampled answer per query with a seed that never changes, so evaluations differ by the
    student alone (and by which answers it now samples)."""
    import torch
    import torch.distributed as dist

    times = {"rollout_s": 0.0, "score_s": 0.0}
    single = op.model_copy(update={"samples_per_query": 1, "teacher_topk": 0})  # the sampled-token estimate
    answers = rollout_and_score(engines, prompts, [seed_of(seed, rank, i, 17) for i in range(len(prompts))], single,
                                times) if prompts else []
    totals = torch.zeros(2, dtype=torch.float64)
    engine.eval()
    with torch.no_grad():
        if answers:
            lp = student_logprobs(engine.module, answers, pad_id, engine.device).cpu()
            totals[0] += float((lp - flat(answers, "teacher_logprobs", "cpu")).sum())
            totals[1] += len(lp)
    engine.train()
    if dist.is_initialized():
        dist.all_reduce(totals)
    return float(totals[0] / totals[1]) if totals[1] > 0 else None


def sync_adapter(engine: Any, rollouts: list[Any], version: int, rank: int, zero3: bool) -> None:
    """Rank 0 sends the current adapter to every rollout engine; every rank joins a ZeRO-3 gather
    and waits, so no rank samples with the old one."""
    import deepspeed
    import ray
    import torch.distributed as dist

    from raydistill.student.on_policy_engines import adapter_files

    trainable = [p for p in engine.module.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None, enabled=zero3):
        if rank == 0:
            with tempfile.TemporaryDirectory(prefix="raydistill-adapter-") as folder:
                files = adapter_files(engine.module, Path(folder))
            files_ref = ray.put(files)  # one copy in the object store, whatever the pool's size
            ray.get([actor.load_adapter.remote(version, files_ref) for actor in rollouts])
    if dist.is_initialized():
        dist.barrier()


def run_on_policy(w: Any) -> float:
    """The on-policy steps of a ``loop.Worker`` (after its off-policy ones); returns the wall time."""
    from raydistill.student.loop import log_row, metrics_row
    from raydistill.student.on_policy_engines import get_engines

    cfg, op = w.cfg, w.cfg.train.on_policy
    first = w.step - cfg.off_policy_steps  # on-policy steps already taken (a resumed run)
    if first >= op.steps:
        return 0.0
    import ray.train
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    train_prompts, held_out = load_queries(cfg.on_policy_queries, w.rank, world)
    pools = get_engines(cfg.engines_key, op.rollout_engines, op.scorer_engines)
    engines = {role: actors[w.rank % len(actors)] for role, actors in pools.items()}  # this rank's engines
    zero3 = cfg.train.zero_stage == 3
    started = time.time()
    sync_adapter(w.engine, pools["rollout"], w.step, w.rank, zero3)
    start_kl = None
    if first == 0 and op.eval_queries:
        start_kl = held_out_reverse_kl(w.engine, engines, held_out, op, cfg.train.seed, w.rank, cfg.pad_token_id)
    for op_step in range(first, op.steps):
        times = {"rollout_s": 0.0, "score_s": 0.0, "update_s": 0.0, "sync_s": 0.0}
        if op_step > first and op_step % op.refresh_every == 0:
            t = time.time()
            sync_adapter(w.engine, pools["rollout"], w.step, w.rank, zero3)
            times["sync_s"] += time.time() - t
        queries = step_queries(train_prompts, op_step, op.queries_per_step, seed_of(cfg.train.seed, w.rank))
        seeds = [seed_of(cfg.train.seed, w.rank, op_step, j) for j in range(len(queries))]
        answers = rollout_and_score(engines, queries, seeds, op, times)
        t = time.time()
        loss, kl, gap, tokens = update(w.engine, answers, cfg.pad_token_id, cfg.train.gradient_accumulation_steps,
                                       op.importance_clip, op.teacher_topk)
        times["update_s"] += time.time() - t
        w.tokens += sum(len(a.input_ids) for a in answers)
        w.step += 1
        last = op_step + 1 == op.steps
        # "loss" stays empty: the surrogate's value means nothing; the reverse KL is what goes down
        teacher_tokens = int(times.pop("teacher_tokens", 0))
        w.row = {**metrics_row(w, 0), "phase": "on_policy", "reverse_kl": mean_over_ranks(kl, tokens),
                 "surrogate_loss": loss, "rollout_logprob_gap": mean_over_ranks(gap, tokens),
                 "answer_tokens": int(sum_over_ranks(tokens)), "teacher_tokens": int(sum_over_ranks(teacher_tokens)),
                 **{k: round(v, 3) for k, v in times.items()}}
        if start_kl is not None:
            w.row["start_eval_reverse_kl"], start_kl = start_kl, None
        if op.eval_queries and (last or bool(op.eval_every and (op_step + 1) % op.eval_every == 0)):
            w.row["eval_reverse_kl"] = held_out_reverse_kl(w.engine, engines, held_out, op, cfg.train.seed, w.rank,
                                                           cfg.pad_token_id)
        if w.rank == 0:
            log_row(w)
        checkpoint_now = bool(cfg.train.checkpoint_every) and w.step % cfg.train.checkpoint_every == 0 and not last
        if checkpoint_now:
            from raydistill.student.checkpoint import LoopState, report_with_checkpoint

            state = LoopState(step=w.step, epoch=0, tokens_worker=w.tokens, lora=True)
            report_with_checkpoint(w.engine, w.row, state, cfg.metrics_path, w.rank)
        else:
            ray.train.report(w.row)
    return time.time() - started


def sum_over_ranks(value: float) -> float:
    import torch
    import torch.distributed as dist

    total = torch.tensor([float(value)], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(total)
    return float(total[0])


def mean_over_ranks(value: float, weight: int) -> float:
    """A token-weighted mean of a per-rank value across ranks."""
    import torch
    import torch.distributed as dist

    totals = torch.tensor([value * weight, float(weight)], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(totals)
    return float(totals[0] / max(1.0, float(totals[1])))


PHASES = ("rollout_s", "score_s", "update_s", "sync_s")


def on_policy_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Held-out reverse KL at the start and end of the on-policy steps, the training batches' mean
    reverse KL, and the mean seconds per step of each phase (pure)."""
    steps = [r for r in rows if r.get("phase") == "on_policy"]
    start = next((r["start_eval_reverse_kl"] for r in steps if r.get("start_eval_reverse_kl") is not None), None)
    evals = [r["eval_reverse_kl"] for r in steps if r.get("eval_reverse_kl") is not None]
    return {
        "steps": len(steps),
        "start_eval_reverse_kl": start,
        "final_eval_reverse_kl": evals[-1] if evals else None,
        "teacher_tokens": sum(r.get("teacher_tokens", 0) for r in steps),
        "first_reverse_kl": steps[0]["reverse_kl"] if steps else None,
        "last_reverse_kl": steps[-1]["reverse_kl"] if steps else None,
        "seconds_per_step": {k: round(sum(r.get(k, 0.0) for r in steps) / len(steps), 3) if steps else None
                             for k in PHASES},
    }
