"""The prompted teacher as a judge: how likely is an answer under the teacher *with* its target prompt?

An answer's score is the mean log-probability per token that the teacher, given the target prompt
and the query, puts on the answer's tokens (its end of turn included, so stopping at the right
place counts too). vLLM computes it in one prefill pass with ``prompt_logprobs=0``: the log-prob
of each prompt token given the tokens before it, no decoding. Pure, but for ``score_answers``,
the thin Ray Data shell that runs the requests through the teacher's engines (``ray.data.llm``).

Note: vLLM does not read the prefix cache for requests that ask for prompt log-probs (each
position's logits are needed), so every scored answer prefills its whole prompt.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pyarrow as pa

from raydistill.render import render_completion, render_prompt
from raydistill.schema import check_batch
from raydistill.tasks.task import TaskSpec

logger = logging.getLogger(__name__)

SCORE_COLUMNS = ("id", "task", "system", "query", "answer")  # what ScoreRequests reads
SCORES = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("task", pa.string()),
        pa.field("system", pa.string(), nullable=False),
        # mean log-prob per answer token under the prompted teacher (null: not scored, see error)
        pa.field("teacher_logprob", pa.float64()),
        pa.field("answer_tokens", pa.int32()),
        pa.field("error", pa.string()),
    ]
)


def scored_tokens(tokenizer: Any, task: TaskSpec, query: str, answer: str) -> tuple[list[int], int]:
    """Token ids of the teacher's chat (target prompt, query) with ``answer`` as its reply, and the
    index of the answer's first token. The task's forced answer prefix is part of the prompt, not of
    the answer (every system's answer starts with it or is scored as its continuation)."""
    messages = task.teacher_messages(query)
    prefix = task.assistant_prefix
    body = answer[len(prefix):] if prefix and answer.startswith(prefix) else answer
    prompt = render_prompt(tokenizer, messages)
    completion = render_completion(tokenizer, messages, prefix + body, prompt)  # prefix + body + end of turn
    head_ids = tokenizer(prompt + prefix, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(prompt + completion, add_special_tokens=False)["input_ids"]
    if full_ids[: len(head_ids)] != head_ids or len(full_ids) == len(head_ids):
        # the answer's first characters merged with the prefix's last token: split at the text instead
        full_ids = head_ids + tokenizer(completion[len(prefix):], add_special_tokens=False)["input_ids"]
    return full_ids, len(head_ids)


def mean_logprob(prompt_logprobs: Any, token_ids: Any, start: int) -> tuple[float, int]:
    """(mean log-prob, tokens) of ``token_ids[start:]`` from vLLM's per-position prompt log-probs
    (``{token_id: {"logprob": ...}}`` per position; the sampled-token entry is always present)."""
    ids = [int(t) for t in token_ids]
    total = 0.0
    for pos in range(start, len(ids)):
        entry = {int(t): v for t, v in prompt_logprobs[pos].items()}
        total += float(entry[ids[pos]]["logprob"])
    n = len(ids) - start
    return (total / n if n else math.nan), n


class ScoreRequests:
    """Ray Data UDF: (query, answer) rows → token-id requests for the teacher's engine."""

    def __init__(self, model_path: str, tasks: dict[str, TaskSpec], max_model_len: int):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.tasks, self.max_model_len = tasks, max_model_len

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        check_batch(batch, SCORE_COLUMNS, "the teacher's answer scorer")
        out: dict[str, list[Any]] = {k: [] for k in ("id", "task", "system", "tokenized_prompt", "answer_start",
                                                     "sampling_params", "too_long")}
        for qid, key, system, query, answer in zip(*(batch[c] for c in SCORE_COLUMNS)):
            ids, start = scored_tokens(self.tokenizer, self.tasks[str(key)], str(query), str(answer or ""))
            too_long = len(ids) + 1 > self.max_model_len
            out["id"].append(str(qid))
            out["task"].append(str(key))
            out["system"].append(str(system))
            # an over-long row is sent as its first token only and reported as not scored
            out["tokenized_prompt"].append(ids[:1] if too_long else ids)
            out["answer_start"].append(start)
            out["too_long"].append(too_long)
            out["sampling_params"].append({"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0})
        return out


def read_scores(batch: dict[str, np.ndarray]) -> pa.Table:
    """Engine outputs → SCORES rows (pure)."""
    n = len(batch["id"])
    errors = batch.get("__inference_error__", np.array([""] * n, dtype=object))
    rows = []
    for i in range(n):
        lp, count, error = None, None, str(errors[i] or "") or None
        if bool(batch["too_long"][i]):
            error = "prompt and answer are longer than teacher.max_model_len; raise it to score this answer"
        elif error is None:
            lp, count = mean_logprob(batch["prompt_logprobs"][i], batch["prompt_token_ids"][i], int(batch["answer_start"][i]))
        rows.append({"id": str(batch["id"][i]), "task": str(batch["task"][i]), "system": str(batch["system"][i]),
                     "teacher_logprob": lp, "answer_tokens": count, "error": error})
    return pa.Table.from_pylist(rows, schema=SCORES)


def score_answers(answers: Any, tasks: dict[str, TaskSpec], teacher_cfg: Any, model_path: str) -> Any:
    """A Ray Dataset of (id, task, system, query, answer) rows → one of SCORES rows, scored by the
    teacher's engines (``ray.data.llm``, configured as for sampling: ``teacher.*``)."""
    import ray.data
    from ray.data.llm import build_processor

    from raydistill.teacher.generate import processor_config

    requests = answers.map_batches(
        ScoreRequests, fn_constructor_kwargs={"model_path": model_path, "tasks": tasks,
                                              "max_model_len": teacher_cfg.max_model_len},
        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5, batch_size=teacher_cfg.batch_size)
    processor = build_processor(processor_config(teacher_cfg, model_path))
    return processor(requests).map_batches(read_scores, batch_format="numpy", num_cpus=0.25)
