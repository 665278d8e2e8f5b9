"""On-policy distillation, the pure parts: the two prompts of a query, the teacher's view of a
student answer, the tokenizer check, and the reverse-KL loss.

The student answers a bare training query (sampled on a vLLM engine that holds its current LoRA
adapter); the teacher, *with* the target prompt, gives the log-prob of each of those tokens in one
prefill (``prompt_logprobs``); the student is then updated on the per-token reverse KL,
KL(student || prompted teacher) estimated on its own samples: each token's advantage is
``teacher_logprob - student_logprob``. This is distillation where the student learns what to do
*on its own mistakes* (Agarwal et al. 2024, GKD; Lu & Thinking Machines 2025, "On-policy
distillation"): off-policy training only ever sees the teacher's answers.

Token identity matters: the teacher scores the student's token ids as they are (re-tokenizing the
decoded text could split them differently), so both must share a vocabulary and end an answer with
the same token (``check_same_tokenizer``). A forced answer prefix belongs to the teacher's prompt,
as in fidelity scoring (``teacher/scoring.py``): the student's leading tokens that say it are
forced for the teacher (log-prob 0), and an answer that does not start with it is scored as its
continuation.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from raydistill.errors import ConfigError
from raydistill.render import render_completion, render_prompt
from raydistill.tasks.task import TaskSpec


@dataclasses.dataclass(frozen=True)
class QueryPrompts:
    """One query's prompts as token ids."""

    student: list[int]  # the student's chat as served (a free task's forced prefix included)
    teacher: list[int]  # the teacher's chat with the target prompt, its forced prefix included
    prefix: list[int]  # the forced prefix's tokens after the generation prompt ([] without one)
    student_has_prefix: bool  # whether the student's prompt already ends with the prefix


def query_prompts(student_tokenizer: Any, teacher_tokenizer: Any, task: TaskSpec, query: str,
                  student_prefixed: bool) -> QueryPrompts:
    """A query's prompts: the student's rendered by its own chat template, with the task's forced
    prefix where the served student gets it too (``student_prefixed``: see ``serves_prefix``),
    the teacher's by its own template, always with the prefix."""
    prefix = task.assistant_prefix
    prefixed = bool(prefix) and student_prefixed
    student = render_prompt(student_tokenizer, task.student_messages(query), prefix if prefixed else "")
    teacher = render_prompt(teacher_tokenizer, task.teacher_messages(query))
    head = teacher_tokenizer(teacher, add_special_tokens=False)["input_ids"]
    full = teacher_tokenizer(teacher + prefix, add_special_tokens=False)["input_ids"]
    prefix_ids = full[len(head):] if full[: len(head)] == head else teacher_tokenizer(prefix, add_special_tokens=False)["input_ids"]
    return QueryPrompts(student=student_tokenizer(student, add_special_tokens=False)["input_ids"],
                        teacher=head + prefix_ids, prefix=prefix_ids, student_has_prefix=prefixed)


def serves_prefix(task: TaskSpec, cfg: Any) -> bool:
    """Whether the served student gets the task's forced prefix (``serve/stage.py``): a free task's
    always; a labelled task's when it learns the teacher's whole response and
    ``serve.student_answer_prefix`` is on. Rollouts are sampled the same way."""
    return task.free or (cfg.serve.student_answer_prefix and cfg.train.target == "response")


def teacher_view(prompts: QueryPrompts, completion: list[int]) -> tuple[list[int], int, int]:
    """The token ids the teacher scores for a student ``completion``, the index of the first scored
    one, and how many leading completion tokens the teacher was forced to say (its log-prob 0)."""
    forced = 0
    if prompts.prefix and not prompts.student_has_prefix and completion[: len(prompts.prefix)] == prompts.prefix:
        forced = len(prompts.prefix)
    return prompts.teacher + completion[forced:], len(prompts.teacher), forced


def _logprob(entry: Any) -> float:
    return float(entry["logprob"] if isinstance(entry, dict) else entry.logprob)


def teacher_token_logprobs(prompt_logprobs: Any, token_ids: list[int], start: int, forced: int) -> list[float]:
    """Per completion token, the teacher's log-prob: 0 for forced prefix tokens, then vLLM's
    prompt log-prob of each scored token (``{token_id: Logprob or {"logprob": ...}}`` per position)."""
    out = [0.0] * forced
    for pos in range(start, len(token_ids)):
        out.append(_logprob(prompt_logprobs[pos][token_ids[pos]]))
    return out


def teacher_top_logprobs(prompt_logprobs: Any, token_ids: list[int], start: int,
                         forced: list[int]) -> tuple[list[list[int]], list[list[float]]]:
    """Per completion token, the teacher's top tokens at that position and their log-probs (vLLM's
    top-k prompt log-probs, the scored token among them); a forced prefix token is certain."""
    ids: list[list[int]] = [[t] for t in forced]
    lps: list[list[float]] = [[0.0] for _ in forced]
    for pos in range(start, len(token_ids)):
        entries = prompt_logprobs[pos]
        ids.append([int(t) for t in entries])
        lps.append([_logprob(v) for v in entries.values()])
    return ids, lps


def topk_reverse_kl(student_logprobs: Any, top_ids: Any, top_logprobs: Any, mask: Any) -> Any:
    """Mean over positions of KL(student || teacher) on the teacher's top tokens plus one bucket
    for the rest of the vocabulary: exact for those coarsened distributions (a lower bound of the
    full KL), and differentiable in the student's whole distribution at every position, so each
    sampled position gives a dense signal rather than one token's. ``student_logprobs``: [N, V]
    log-softmax; ``top_ids``/``top_logprobs``/``mask``: [N, k], padded slots masked out."""
    import torch

    tiny = 1e-6
    s_top = student_logprobs.gather(-1, top_ids).masked_fill(~mask, float("-inf"))
    t_top = top_logprobs.float().masked_fill(~mask, float("-inf"))
    s_p, t_p = s_top.exp(), t_top.exp()
    s_rest = (1 - s_p.sum(-1)).clamp(min=tiny)
    t_rest = (1 - t_p.sum(-1)).clamp(min=tiny)
    on_top = torch.where(mask, s_p * (s_top - t_top), torch.zeros_like(s_p)).sum(-1)
    return (on_top + s_rest * (s_rest.log() - t_rest.log())).mean()


def check_same_tokenizer(student: Any, teacher: Any, student_name: str, teacher_name: str) -> None:
    """Refuse a teacher that would read the student's token ids as other text: different
    vocabularies, or chat templates that end an answer with different tokens."""
    s_vocab, t_vocab = student.get_vocab(), teacher.get_vocab()
    if s_vocab != t_vocab:
        differing = sorted(set(s_vocab.items()) ^ set(t_vocab.items()), key=lambda kv: kv[1])[:1]
        example = f"; e.g. token {differing[0][0]!r} (id {differing[0][1]})" if differing else ""
        raise ConfigError(
            f"train.on_policy scores the student's tokens under the teacher, but the student {student_name!r} "
            f"({len(s_vocab)} tokens) and the teacher {teacher_name!r} ({len(t_vocab)} tokens) tokenize differently"
            f"{example}; use a teacher and student of one model family (the same tokenizer)")
    chat = [{"role": "user", "content": "hi"}]
    ends = [tok(render_completion(tok, chat, "ok"), add_special_tokens=False)["input_ids"] for tok in (student, teacher)]
    if ends[0] != ends[1]:
        raise ConfigError(
            f"train.on_policy: the student {student_name!r} and the teacher {teacher_name!r} end an answer with "
            f"different tokens ({ends[0]} vs {ends[1]}: their chat templates differ); use models with the same chat template")


def reverse_kl_loss(student_logprobs: Any, rollout_logprobs: Any, teacher_logprobs: Any,
                    importance_clip: float) -> tuple[Any, Any, Any]:
    """(loss, mean per-token reverse KL, mean log-prob gap of the trained student over the rollout
    engine) over a step's answer tokens (1-D tensors, one entry per token). The gap is ~0 right
    after the adapter is sent, up to the two engines' numerics (dtype, kernels): a large one
    means the rollout engine is not sampling the student being trained.

    With advantages ``a = teacher - student`` (held constant), the gradient of
    ``-mean(w * a * log p_student)`` is the reverse KL's policy gradient, token by token (no
    credit to later tokens: the per-token form of on-policy distillation). The advantages are
    centred on their batch mean: a constant baseline leaves the expected gradient as it is
    (``E[grad log p] = 0`` at every position) and removes most of its variance, since nearly every
    sampled token has a positive KL term and would otherwise only be pushed down. ``w`` is the
    importance weight of answers sampled by an older adapter (1 when the rollout engine is up to
    date), clipped at ``importance_clip`` so a stale, unlikely token cannot dominate a step."""
    import torch

    with torch.no_grad():
        current = student_logprobs.detach()
        kl = current - teacher_logprobs
        weight = torch.exp(current - rollout_logprobs).clamp(max=importance_clip)
        centred = kl - kl.mean()
    loss = (weight * centred * student_logprobs).mean()
    return loss, kl.mean(), (current - rollout_logprobs).mean()
