"""Soft targets: the teacher's top-k tokens line up with the student's positions, and the KL
term is the right number, changes the loss, and has gradients."""

import math

import numpy as np
import pytest
import torch

from raydistill.student.examples import IGNORE_INDEX, build_examples_batch, build_soft_example, collate, is_validation
from raydistill.student.loss import answer_only_loss, topk_kl
from raydistill.tasks.task import load_task


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer):
    return smollm2_tokenizer


def test_validation_split_is_by_query_id():
    ids = [f"q{i}" for i in range(4000)]
    held = [i for i in ids if is_validation(i, 0.1)]
    assert 300 < len(held) < 500
    assert held == [i for i in ids if is_validation(i, 0.1)]  # deterministic
    assert not any(is_validation(i, 0.0) for i in ids)


def test_soft_example_aligns_teacher_tokens(tokenizer):
    teacher_ids = tokenizer(" Spanish.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    top_ids = [[t, 5] for t in teacher_ids]
    top_lps = [[-0.1, -2.5] for _ in teacher_ids]
    ex = build_soft_example(tokenizer, [{"role": "user", "content": "Hola"}], "This text is written in", teacher_ids, top_ids, top_lps, 256)
    ids, labels = ex["input_ids"], ex["labels"]
    assert ids[-len(teacher_ids):] == teacher_ids  # the teacher's own ids, not a re-tokenization
    assert tokenizer.decode(ids).endswith("assistant\nThis text is written in Spanish.<|im_end|>")
    first_answer = next(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX)
    assert tokenizer.decode(ids[first_answer:]).startswith("This text")  # the prefix is trained too
    assert [ids[p] for p in ex["soft_pos"]] == teacher_ids  # each distribution sits on the token it predicts
    assert ex["soft_ids"].shape == (len(teacher_ids), 2)


def test_truncated_answer_still_ends_the_turn(tokenizer):
    ex = build_soft_example(tokenizer, [{"role": "user", "content": "Hola"}], "", [100, 200], [[100], [200]], [[-0.5], [-0.5]], 256)
    assert ex["input_ids"][-1] == tokenizer.eos_token_id and ex["input_ids"][-3:-1] == [100, 200]
    assert len(ex["soft_pos"]) == 2


def test_batch_marks_val_rows_and_collates_soft_arrays(tokenizer):
    task = load_task("langid")
    n = 6
    batch = {
        "id": np.array([f"id{i}" for i in range(n)], dtype=object), "query": np.array(["Hola"] * n, dtype=object),
        "label": np.array(["es"] * n, dtype=object), "response": np.array([" Spanish"] * n, dtype=object),
        "token_ids": np.array([[11, 12]] * n, dtype=object),
        "top_token_ids": np.array([[[11, 3, 4], [12, 3, 4]]] * n, dtype=object),
        "top_logprobs": np.array([[[-0.1, -3, -4], [-0.2, -3, -4]]] * n, dtype=object),
    }
    out = build_examples_batch(batch, tokenizer=tokenizer, tasks={"langid": task}, target="response", max_seq_len=256,
                               val_fraction=0.5, soft=True)
    assert list(out["val"]) == [is_validation(f"id{i}", 0.5) for i in range(n)]
    arrays = collate({k: out[k] for k in ("input_ids", "labels", "soft_pos", "soft_ids", "soft_logprobs")}, 0)
    assert arrays["soft_ids"].shape == (n, arrays["input_ids"].shape[1], 3)
    assert arrays["soft_mask"].sum() == 2 * n
    rows, cols = np.nonzero(arrays["soft_mask"])
    assert set(arrays["input_ids"][rows, cols]) == {11, 12}


def test_topk_kl_value():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    teacher_lp = torch.log(torch.tensor([[0.75, 0.25]]))
    ids = torch.tensor([[0, 2]])
    p = torch.softmax(logits, -1)[0]
    expected = 0.75 * math.log(0.75 / p[0]) + 0.25 * math.log(0.25 / p[2])
    assert topk_kl(logits, ids, teacher_lp).item() == pytest.approx(expected, rel=1e-5)
    padded = topk_kl(logits, torch.tensor([[0, 2, 3]]), torch.tensor([[math.log(0.75), math.log(0.25), -1e9]]))
    assert padded.item() == pytest.approx(expected, rel=1e-5)  # a padded slot carries no mass


def test_kl_changes_the_loss_and_has_gradients(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    ids = torch.tensor([[1, 5, 7, 9, 11, 13]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 7, 9, 11, 13]])
    mask = torch.zeros(1, 6, dtype=torch.bool)
    mask[0, 3:5] = True
    soft_ids = torch.zeros(1, 6, 2, dtype=torch.long)
    soft_ids[0, 3], soft_ids[0, 4] = torch.tensor([9, 2]), torch.tensor([11, 3])
    soft_lps = torch.full((1, 6, 2), -1e9)
    soft_lps[0, 3:5] = torch.log(torch.tensor([0.9, 0.1]))
    common = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    ce = answer_only_loss(model, **common)
    mixed = answer_only_loss(model, **common, soft_ids=soft_ids, soft_logprobs=soft_lps, soft_mask=mask, kl_weight=0.5)
    assert not torch.isclose(ce, mixed)
    mixed.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
