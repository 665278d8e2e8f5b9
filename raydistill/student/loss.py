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


def answer_only_loss(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    lm = causal_lm_of(model)
    hidden = lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    targets = labels[:, 1:]  # position t predicts token t + 1
    keep = targets != IGNORE_INDEX
    logits = lm.get_output_embeddings()(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), targets[keep])
