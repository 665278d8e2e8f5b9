"""The distillation loss on answer tokens only, without computing logits for the prompt.

A causal LM's forward computes vocabulary logits at every position, but our loss needs them
only where the label is an answer token (a few per example). With a 49k vocabulary that head
and its softmax are a large share of a small model's step, so we run the decoder, gather the
answer positions and apply the LM head to those alone. The result equals the model's own
mean token cross-entropy (tested).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from raydistill.student.examples import IGNORE_INDEX


def causal_lm_of(model: Any) -> Any:
    """The HF causal LM inside a PEFT wrapper (LoRA layers stay injected in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def answer_only_loss(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
    soft_ids: torch.Tensor | None = None, soft_logprobs: torch.Tensor | None = None,
    soft_mask: torch.Tensor | None = None, kl_weight: float = 0.0,
) -> torch.Tensor:
    """Mean cross-entropy on the answer tokens; with ``kl_weight`` > 0 and soft targets, mixed
    as (1 - w) * CE + w * KL(teacher top-k || student) over the teacher's generated tokens."""
    lm = causal_lm_of(model)
    hidden = lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    targets = labels[:, 1:]  # position t predicts token t + 1
    keep = targets != IGNORE_INDEX
    logits = lm.get_output_embeddings()(hidden[:, :-1][keep]).float()
    ce = F.cross_entropy(logits, targets[keep])
    if kl_weight <= 0 or soft_ids is None or soft_logprobs is None or soft_mask is None:
        return ce
    has_soft = soft_mask[:, 1:][keep]  # soft targets are stored at the position of the token they predict
    if not bool(has_soft.any()):
        return ce
    kl = topk_kl(logits[has_soft], soft_ids[:, 1:][keep][has_soft], soft_logprobs[:, 1:][keep][has_soft])
    return (1.0 - kl_weight) * ce + kl_weight * kl


def topk_kl(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(q || p): q is the teacher's top-k distribution (renormalised
    over its k tokens), p the student's full softmax read at those k tokens. Minimising it
    moves the student's mass onto the teacher's likely tokens in the teacher's proportions."""
    student = F.log_softmax(student_logits, dim=-1).gather(-1, teacher_ids)
    teacher = F.log_softmax(teacher_logprobs.float(), dim=-1)  # padded slots (-1e9) get q = 0
    q = teacher.exp()
    return (q * (teacher - student)).sum(-1).mean()
