"""Masked training examples (pure): the bare query rendered as the student sees it, and a loss
on the answer tokens only; optionally the teacher's top-k distribution at each of its tokens."""

from __future__ import annotations

from typing import Any

import numpy as np

from raydistill.ids import hash_bucket
from raydistill.render import render_completion, render_prompt
from raydistill.schema import check_batch
from raydistill.tasks.pipeline_tasks import repeats
from raydistill.tasks.task import TaskSpec

IGNORE_INDEX = -100
PAD_LOGPROB = -1e9  # a padded top-k slot: zero probability after the softmax


def is_validation(query_id: str, fraction: float) -> bool:
    """The held-out split, by query id: all samples of a query fall on the same side."""
    if fraction <= 0:
        return False
    return hash_bucket(f"val:{query_id}") < fraction


def build_example(tokenizer: Any, messages: list[dict[str, str]], answer: str, max_seq_len: int) -> dict[str, list[int]] | None:
    """input_ids + labels (-100 on prompt tokens), or None if longer than ``max_seq_len``.

    ``messages`` is the student's chat (``TaskSpec.student_messages``): the bare query."""
    return build_examples(tokenizer, [messages], [answer], max_seq_len)[0]


def build_examples(tokenizer: Any, chats: list[list[dict[str, str]]], answers: list[str],
                   max_seq_len: int) -> list[dict[str, list[int]] | None]:
    """``build_example`` for many chats: the texts are rendered one by one, then tokenized in two
    batched calls, which a fast tokenizer runs in parallel (one call per text was half the
    builder's time, bench/results/scale.md)."""
    prompts = [render_prompt(tokenizer, messages) for messages in chats]
    completions = [render_completion(tokenizer, messages, answer, prompt)
                   for messages, answer, prompt in zip(chats, answers, prompts)]
    if not prompts:
        return []
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(completions, add_special_tokens=False)["input_ids"]
    return [
        None if len(p) + len(a) > max_seq_len else {"input_ids": p + a, "labels": [IGNORE_INDEX] * len(p) + a}
        for p, a in zip(prompt_ids, answer_ids)
    ]


def build_soft_example(
    tokenizer: Any, messages: list[dict[str, str]], prefix: str, token_ids: list[int], top_ids: list[list[int]],
    top_logprobs: list[list[float]], max_seq_len: int,
) -> dict[str, Any] | None:
    """The teacher's own tokens as the answer (prefix + generated ids + end of turn), with its
    top-k distribution at each generated token, so a KL term can be taken position by position.
    Token ids are used as they are: re-tokenizing the decoded text could shift the alignment."""
    prompt = render_prompt(tokenizer, messages)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    with_prefix = tokenizer(prompt + prefix, add_special_tokens=False)["input_ids"]
    if with_prefix[: len(prompt_ids)] != prompt_ids:  # the prefix merged into the template's last token
        with_prefix = prompt_ids + tokenizer(prefix, add_special_tokens=False)["input_ids"]
    answer = [int(t) for t in token_ids]
    if not answer or answer[-1] != tokenizer.eos_token_id:
        answer.append(tokenizer.eos_token_id)  # a truncated answer still ends the turn
    input_ids = with_prefix + answer
    if len(input_ids) > max_seq_len:
        return None
    k = max((len(t) for t in top_ids), default=0)
    soft_ids = np.zeros((len(top_ids), k), dtype=np.int64)
    soft_lps = np.full((len(top_ids), k), PAD_LOGPROB, dtype=np.float32)
    for j, (ids, lps) in enumerate(zip(top_ids, top_logprobs)):
        soft_ids[j, : len(ids)] = ids
        soft_lps[j, : len(lps)] = lps
    start = len(with_prefix)
    return {
        "input_ids": input_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + input_ids[len(prompt_ids) :],
        "soft_pos": np.arange(start, start + len(top_ids), dtype=np.int64),  # the tokens they predict
        "soft_ids": soft_ids,
        "soft_logprobs": soft_lps,
    }


# The samples columns the example builder reads; ``task`` and ``sample_index`` are optional
# (samples written before several tasks existed have neither).
EXAMPLE_COLUMNS = ("id", "query", "label", "response")
SOFT_COLUMNS = ("token_ids", "top_token_ids", "top_logprobs")
OPTIONAL_COLUMNS = ("task", "sample_index")


def builder_columns(soft: bool) -> tuple[str, ...]:
    """The columns ``build_examples_batch`` reads."""
    return (*EXAMPLE_COLUMNS, *(SOFT_COLUMNS if soft else ()))


def example_columns(soft: bool) -> tuple[str, ...]:
    """The samples columns training needs (``valid`` filters them before the builder sees them)."""
    return ("valid", *builder_columns(soft))


def build_examples_batch(
    batch: dict[str, np.ndarray], *, tokenizer: Any, tasks: dict[str, TaskSpec], target: str, max_seq_len: int,
    val_fraction: float = 0.0, soft: bool = False, factors: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Samples rows → example rows (``val`` marks the held-out split), each in its own task's
    student format; rows too long for ``max_seq_len`` are dropped. With ``soft``, the teacher's
    top-k logprobs come along. ``factors`` (task → copies, see ``pipeline_tasks.task_factors``)
    re-weights the tasks in the training split; the validation split is left as it is."""
    check_batch(batch, builder_columns(soft), "the training example builder")
    cols: dict[str, list[Any]] = {k: [] for k in ("id", "task", "input_ids", "labels", "val", "soft_pos", "soft_ids", "soft_logprobs")}
    # samples of one task, written before tasks existed, have no task column
    keys = [str(k) if k is not None else next(iter(tasks)) for k in (batch["task"] if "task" in batch else [None] * len(batch["id"]))]
    chats = [tasks[key].student_messages(str(query)) for key, query in zip(keys, batch["query"])]
    if soft:
        examples = [build_soft_example(tokenizer, messages, tasks[key].assistant_prefix, list(batch["token_ids"][i]),
                                       list(batch["top_token_ids"][i]), list(batch["top_logprobs"][i]), max_seq_len)
                    for i, (key, messages) in enumerate(zip(keys, chats))]
    else:
        answers = [tasks[key].target_text(label, response or "", target)  # type: ignore[arg-type]
                   for key, label, response in zip(keys, batch["label"], batch["response"])]
        examples = build_examples(tokenizer, chats, answers, max_seq_len)
    for i, (qid, key, example) in enumerate(zip(batch["id"], keys, examples)):
        if example is None:
            continue
        val = is_validation(str(qid), val_fraction)
        copies = 1 if val or not factors else repeats(factors[key], f"{qid}\t{_sample_index(batch, i)}")
        for _ in range(copies):
            cols["id"].append(qid)
            cols["task"].append(key)
            cols["input_ids"].append(np.asarray(example["input_ids"], dtype=np.int64))
            cols["labels"].append(np.asarray(example["labels"], dtype=np.int64))
            cols["val"].append(val)
            if soft:
                for name in ("soft_pos", "soft_ids", "soft_logprobs"):
                    cols[name].append(example[name])
    out = {"id": np.asarray(cols["id"], dtype=object), "task": np.asarray(cols["task"], dtype=object),
           "input_ids": _ragged(cols["input_ids"]), "labels": _ragged(cols["labels"]),
           "val": np.asarray(cols["val"], dtype=bool)}
    if soft:
        out.update({key: _ragged(cols[key]) for key in ("soft_pos", "soft_ids", "soft_logprobs")})
    return out


def _sample_index(batch: dict[str, np.ndarray], i: int) -> int:
    return int(batch["sample_index"][i]) if "sample_index" in batch else 0


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out


def collate(batch: dict[str, np.ndarray], pad_token_id: int) -> dict[str, np.ndarray]:
    """Right-pad a batch of ragged examples to its longest row; mask the padding. Soft targets
    become dense [batch, length, k] arrays with a [batch, length] mask of the positions that have them."""
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
    out = {"input_ids": input_ids, "labels": labels, "attention_mask": attention}
    if "soft_pos" in batch:
        k = max((s.shape[1] for s in batch["soft_ids"] if s.size), default=1)
        soft_ids = np.zeros((n, width, k), dtype=np.int64)
        soft_lps = np.full((n, width, k), PAD_LOGPROB, dtype=np.float32)
        soft_mask = np.zeros((n, width), dtype=bool)
        for i, (pos, ids, lps) in enumerate(zip(batch["soft_pos"], batch["soft_ids"], batch["soft_logprobs"])):
            soft_ids[i, pos, : ids.shape[1]] = ids
            soft_lps[i, pos, : lps.shape[1]] = lps
            soft_mask[i, pos] = True
        out.update(soft_ids=soft_ids, soft_logprobs=soft_lps, soft_mask=soft_mask)
    return out


def bucket_batches(chunk: dict[str, np.ndarray], batch_size: int, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    """Length bucketing: sort a chunk of examples by length, cut it into batches (a short tail is
    dropped so every worker takes the same number of steps), and shuffle the batch order. Rows in
    a batch then have similar lengths, so padding stops dominating the compute."""
    order = np.argsort([len(x) for x in chunk["input_ids"]], kind="stable")
    batches = [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    rng.shuffle(batches)
    keys = [k for k in ("input_ids", "labels", "soft_pos", "soft_ids", "soft_logprobs") if k in chunk]
    return [{key: chunk[key][idx] for key in keys} for idx in batches]
