"""The student as the training loop builds it: every layer in train mode, so gradient
checkpointing recomputes each layer in backward (changing neither the loss nor the gradients)
and LoRA dropout is active (tiny model, one process, no DeepSpeed)."""

from __future__ import annotations

import pytest
import torch

from raydistill.config import TrainConfig
from raydistill.student.engine import build_model
from raydistill.student.examples import IGNORE_INDEX
from raydistill.student.loss import answer_only_loss


def loss_grads_and_mlp_calls(model_path: str, **train) -> tuple[float, dict[str, torch.Tensor], int]:
    torch.manual_seed(0)
    model = build_model(model_path, TrainConfig(zero_stage=0, lora_dropout=0.0, **train))
    calls = []
    # a pre-hook: torch stops a recompute once it has the tensors backward needs, so post-hooks may not run
    model.get_decoder().layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    ids = torch.randint(10, 1000, (3, 16), generator=torch.Generator().manual_seed(1))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, 11:] = ids[:, 11:]
    loss = answer_only_loss(model, ids, torch.ones_like(ids), labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach()), grads, len(calls)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_gradient_checkpointing_recomputes_and_keeps_the_gradients(tiny_model, method):
    loss, grads, calls = loss_grads_and_mlp_calls(tiny_model, method=method, gradient_checkpointing=False)
    loss_gc, grads_gc, calls_gc = loss_grads_and_mlp_calls(tiny_model, method=method, gradient_checkpointing=True)
    assert (calls, calls_gc) == (1, 2)  # checkpointed: the layer runs again in backward
    assert loss_gc == pytest.approx(loss, rel=1e-6)
    assert grads.keys() == grads_gc.keys() and grads
    for name, grad in grads.items():
        assert torch.allclose(grads_gc[name], grad, rtol=1e-4, atol=1e-6), name
    assert any(g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("method", ["lora", "full"])
def test_every_layer_is_in_train_mode(tiny_model, method):
    # from_pretrained leaves the layers in eval mode; the loop never calls .train() itself
    model = build_model(tiny_model, TrainConfig(method=method, zero_stage=0))
    assert all(m.training for m in model.modules())


def test_lora_dropout_is_active(tiny_model):
    model = build_model(tiny_model, TrainConfig(method="lora", lora_dropout=0.5, zero_stage=0))
    ids = torch.randint(10, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, 8:] = ids[:, 8:]
    with torch.no_grad():
        # LoRA's B starts at zero, so dropout on the adapter input shows only once B is not zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
        first, second = (answer_only_loss(model, ids, torch.ones_like(ids), labels) for _ in range(2))
        model.eval()
        third, fourth = (answer_only_loss(model, ids, torch.ones_like(ids), labels) for _ in range(2))
    assert float(first) != float(second)  # a different dropout mask each forward
    assert float(third) == float(fourth)  # and none in eval mode


def test_moe_blocks_become_zero3_leaf_modules():
    """Under ZeRO-3 a MoE block gathers all its experts at once (else ranks hang, DeepSpeed #7461)."""
    from deepspeed.utils import z3_leaf_module
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from raydistill.student.engine import mark_moe_leaves, moe_block_classes

    config = Qwen3MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                            num_experts=4, num_experts_per_tok=2)
    moe = Qwen3MoeForCausalLM(config)
    assert [c.__name__ for c in mark_moe_leaves(moe)] == ["Qwen3MoeSparseMoeBlock"]
    blocks = [m for m in moe.modules() if type(m).__name__ == "Qwen3MoeSparseMoeBlock"]
    assert len(blocks) == 2 and all(z3_leaf_module(b) for b in blocks)
    assert not any(z3_leaf_module(m) for m in moe.modules() if m not in blocks)
    dense = Qwen3MoeForCausalLM(Qwen3MoeConfig(**{**config.to_dict(), "mlp_only_layers": [0, 1]}))
    assert moe_block_classes(dense) == [] and mark_moe_leaves(dense) == []
