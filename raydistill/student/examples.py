"""Masked training examples (pure): the bare query rendered as the student sees it, and a loss
on the answer tokens only."""

from __future__ import annotations

from typing import Any

import numpy as np

from raydistill.render import render_completion, render_prompt
from raydistill.tasks.task import TaskSpec

IGNORE_INDEX = -100


def build_example(tokenizer: Any, query: str, answer: str, max_seq_len: int) -> dict[str, list[int]] | None:
    """input_ids + labels (-100 on prompt tokens), or None if longer than ``max_seq_len``."""
    messages = TaskSpec.student_messages(query)
    prompt_ids = tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(render_completion(tokenizer, messages, answer), add_special_tokens=False)["input_ids"]
    if len(prompt_ids) + len(answer_ids) > max_seq_len:
        return None
    return {"input_ids": prompt_ids + answer_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids}


def build_examples_batch(
    batch: dict[str, np.ndarray], *, tokenizer: Any, task: TaskSpec, target: str, max_seq_len: int
) -> dict[str, Any]:
    """Samples rows → example rows; rows too long for ``max_seq_len`` are dropped."""
    input_ids, labels, ids = [], [], []
    for qid, query, label, response in zip(batch["id"], batch["query"], batch["label"], batch["response"]):
        answer = task.target_text(label, response or "", target)  # type: ignore[arg-type]
        example = build_example(tokenizer, str(query), answer, max_seq_len)
        if example is not None:
            input_ids.append(np.asarray(example["input_ids"], dtype=np.int64))
            labels.append(np.asarray(example["labels"], dtype=np.int64))
            ids.append(qid)
    return {"id": np.asarray(ids, dtype=object), "input_ids": _ragged(input_ids), "labels": _ragged(labels)}


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out


def collate(batch: dict[str, np.ndarray], pad_token_id: int) -> dict[str, np.ndarray]:
    """Right-pad a batch of ragged examples to its longest row; mask the padding."""
    lengths = [len(x) for x in batch["input_ids"]]
    width = max(lengths)
    n = len(lengths)
    input_ids = np.full((n, width), pad_token_id, dtype=np.int64)
    labels = np.full((n, width), IGNORE_INDEX, dtype=np.int64)
    attention = np.zeros((n, width), dtype=np.int64)
    for i, (ids, lab) in enumerate(zip(batch["input_ids"], batch["labels"])):
        input_ids[i, : len(ids)] = ids
        labels[i, : len(lab)] = lab
        attention[i, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


def bucket_batches(chunk: dict[str, np.ndarray], batch_size: int, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    """Length bucketing: sort a chunk of examples by length, cut it into batches (a short tail is
    dropped so every worker takes the same number of steps), and shuffle the batch order. Rows in
    a batch then have similar lengths, so padding stops dominating the compute."""
    order = np.argsort([len(x) for x in chunk["input_ids"]], kind="stable")
    batches = [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    rng.shuffle(batches)
    return [{key: chunk[key][idx] for key in ("input_ids", "labels")} for idx in batches]
