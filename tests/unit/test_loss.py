import torch
from transformers import LlamaConfig, LlamaForCausalLM

from raydistill.student.examples import IGNORE_INDEX
from raydistill.student.loss import answer_only_loss


def test_answer_only_loss_equals_full_model_loss_and_backprops():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, 97, (3, 12))
    attention = torch.ones_like(ids)
    attention[2, 9:] = 0  # right padding
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 8:] = ids[0, 8:]
    labels[1, 5:7] = ids[1, 5:7]
    labels[2, 7:9] = ids[2, 7:9]
    ours = answer_only_loss(model, ids, attention, labels)
    reference = model(input_ids=ids, attention_mask=attention, labels=labels).loss
    assert torch.allclose(ours, reference, atol=1e-5)
    ours.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
