"""One optimizer step through a DeepSpeed engine (its micro-batches' forward and backward, the
update), and the validation loss. Free of Ray, so GPU checks run them as they are."""

from __future__ import annotations

from typing import Any

import numpy as np

from raydistill.student.examples import IGNORE_INDEX, collate

KL_KEY = "(kl)"  # evaluate_loss's key for the KL term: parentheses are in no task tag


def to_device(arrays: dict[str, np.ndarray], device: Any) -> dict[str, Any]:
    import torch

    return {k: torch.from_numpy(v).to(device) for k, v in arrays.items()}


def answer_tokens(batch: dict[str, np.ndarray]) -> int:
    """The tokens the loss averages over: positions whose next token is an answer token."""
    return int(sum((np.asarray(labels[1:]) != IGNORE_INDEX).sum() for labels in batch["labels"]))


def accumulation_weights(micro_batches: list[dict[str, np.ndarray]]) -> list[float]:
    """Loss weights that make one accumulated step a mean over all of its answer tokens.

    Each micro-batch's loss is a mean over its own answer tokens, and DeepSpeed divides every
    micro-batch's loss by the accumulation steps k (``engine.backward``, ``scale_wrt_gas``), so
    alone each micro-batch would count 1/k however many tokens it has. Weighting micro-batch i
    by k·nᵢ/N (nᵢ of the step's N answer tokens) turns (1/k)·Σ meanᵢ into Σ (nᵢ/N)·meanᵢ, the
    token mean over the whole step. With k = 1 the weight is exactly 1."""
    counts = [answer_tokens(batch) for batch in micro_batches]
    total = sum(counts)
    if total == 0:
        return [1.0] * len(counts)
    return [len(counts) * n / total for n in counts]


def train_step(engine: Any, batch: dict[str, np.ndarray], pad_id: int, kl_weight: float,
               weight: float = 1.0) -> tuple[float, int]:
    """One micro-batch: forward, backward of ``weight`` times its loss, and the optimizer step
    (DeepSpeed applies it only at gradient-accumulation boundaries). Returns the (unweighted)
    loss and the number of real (unpadded) tokens."""
    from raydistill.student.loss import answer_only_loss  # torch: not imported by the driver

    arrays = collate(batch, pad_id)
    loss = answer_only_loss(engine.module, **to_device(arrays, engine.device), kl_weight=kl_weight)
    engine.backward(loss * weight)
    engine.step()
    return float(loss.detach()), int(arrays["attention_mask"].sum())


def optimizer_step(engine: Any, micro_batches: list[dict[str, np.ndarray]], pad_id: int,
                   kl_weight: float) -> list[tuple[float, int]]:
    """All micro-batches of one optimizer step, their losses weighted by answer tokens; returns
    each micro-batch's loss and real tokens."""
    weights = accumulation_weights(micro_batches)
    return [train_step(engine, batch, pad_id, kl_weight, w) for batch, w in zip(micro_batches, weights)]


def evaluate_loss(engine: Any, shard: Any, batch_size: int, pad_id: int, kl_weight: float,
                  tasks: list[str] | None = None) -> tuple[float | None, dict[str, float | None]]:
    """Mean answer-token loss over the validation split, summed across workers; and, with
    several ``tasks``, the same per task (each batch split by its ``task`` column). With soft
    targets, ``{KL_KEY: ...}`` holds the per-token forward KL(teacher top-k || student) on the
    held-out queries, whatever ``kl_weight`` trains with."""
    import torch
    import torch.distributed as dist

    from raydistill.student.loss import answer_only_loss

    keys = tasks if tasks and len(tasks) > 1 else []
    total = torch.zeros(2 * (1 + len(keys)), dtype=torch.float64)  # (loss x rows, rows): overall, then per task
    kl = torch.zeros(2, dtype=torch.float64)  # (KL x rows, rows) of the rows with soft targets
    engine.eval()
    with torch.no_grad():
        for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
            groups = [(0, np.arange(len(batch["input_ids"])))] if not keys else [
                (1 + j, np.flatnonzero(batch["task"] == key)) for j, key in enumerate(keys)]
            for slot, rows in groups:
                if len(rows) == 0:
                    continue
                part = {k: batch[k][rows] for k in ("input_ids", "labels", "soft_pos", "soft_ids", "soft_logprobs") if k in batch}
                arrays = to_device(collate(part, pad_id), engine.device)
                loss = float(answer_only_loss(engine.module, **arrays, kl_weight=kl_weight))
                if "soft_ids" in arrays:  # kl_weight 1: the KL term alone
                    kl[0] += float(answer_only_loss(engine.module, **arrays, kl_weight=1.0)) * len(rows)
                    kl[1] += len(rows)
                total[2 * slot] += loss * len(rows)
                total[2 * slot + 1] += len(rows)
                if slot:  # a task's rows also count towards the overall loss
                    total[0] += loss * len(rows)
                    total[1] += len(rows)
    engine.train()
    if dist.is_initialized():
        dist.all_reduce(total)
        dist.all_reduce(kl)

    def mean(slot: int) -> float | None:
        return float(total[2 * slot] / total[2 * slot + 1]) if total[2 * slot + 1] > 0 else None

    extra = {KL_KEY: float(kl[0] / kl[1])} if kl[1] > 0 else {}
    return mean(0), {**{key: mean(1 + j) for j, key in enumerate(keys)}, **extra}
