"""One optimizer step of the loop: gradient accumulation weights tokens, not micro-batches,
equally; micro-batches group into steps across epochs; the loop config survives Ray's dict."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from raydistill.config import TrainConfig
from raydistill.student.examples import IGNORE_INDEX, collate
from raydistill.student.loop import optimizer_steps
from raydistill.student.loop_config import LoopConfig
from raydistill.student.loss import answer_only_loss
from raydistill.student.step import accumulation_weights, answer_tokens, optimizer_step, train_step


class AccumulatingEngine:
    """The part of a DeepSpeed engine the step uses: ``backward`` divides by the accumulation
    steps (DeepSpeed's ``scale_wrt_gas``) and gradients add up until ``step`` at the boundary."""

    def __init__(self, module: torch.nn.Module, accumulation: int):
        self.module, self.device, self.accumulation = module, torch.device("cpu"), accumulation

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()

    def step(self) -> None:
        pass


def micro_batch(rng: np.random.Generator, answer_lengths: list[int], length: int = 12) -> dict[str, np.ndarray]:
    ids, labels = [], []
    for n in answer_lengths:
        row = rng.integers(0, 97, size=length).astype(np.int64)
        ids.append(row)
        labels.append(np.where(np.arange(length) >= length - n, row, IGNORE_INDEX).astype(np.int64))
    ragged = {"input_ids": np.empty(len(ids), dtype=object), "labels": np.empty(len(ids), dtype=object)}
    ragged["input_ids"][:], ragged["labels"][:] = ids, labels
    return ragged


def grads_after(accumulate) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64))
    accumulate(model)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_accumulated_step_is_the_token_mean_of_the_whole_step():
    rng = np.random.default_rng(0)
    few, many = micro_batch(rng, [1, 2]), micro_batch(rng, [6, 7])
    assert [answer_tokens(b) for b in (few, many)] == [3, 13]
    assert accumulation_weights([few, many]) == pytest.approx([2 * 3 / 16, 2 * 13 / 16])
    assert accumulation_weights([few]) == [1.0]  # no accumulation: the loss as it is

    def whole_step(model):  # all 16 answer tokens in one batch: their mean loss
        both = {k: np.concatenate([few[k], many[k]]) for k in few}
        arrays = {k: torch.from_numpy(v) for k, v in collate(both, 0).items()}
        answer_only_loss(model, **arrays).backward()

    def accumulated(model):
        optimizer_step(AccumulatingEngine(model, 2), [few, many], pad_id=0, kl_weight=0.0)

    def per_micro_batch_mean(model):  # the old weighting: each micro-batch's mean counts 1/2
        engine = AccumulatingEngine(model, 2)
        for batch in (few, many):
            train_step(engine, batch, pad_id=0, kl_weight=0.0)

    reference, ours, old = grads_after(whole_step), grads_after(accumulated), grads_after(per_micro_batch_mean)
    assert reference.keys() == ours.keys() and reference
    for name, grad in reference.items():
        assert torch.allclose(ours[name], grad, rtol=1e-4, atol=1e-7), name
    assert not all(torch.allclose(old[name], grad, rtol=1e-2, atol=1e-6) for name, grad in reference.items())


def test_micro_batches_group_into_steps_across_epochs():
    micro = iter([(0, "a"), (0, "b"), (0, "c"), (1, "d"), (1, "e")])
    assert list(optimizer_steps(micro, 2)) == [(0, ["a", "b"]), (1, ["c", "d"])]  # "e" waits for a partner


def test_loop_config_round_trips_through_ray_train_dict(tmp_path):
    cfg = LoopConfig(train=TrainConfig(method="full", zero_stage=3), model_path="/m", total_steps=7, pad_token_id=2,
                     export_uri=str(tmp_path / "student"), has_val=True, run_dir=str(tmp_path))
    as_ray = cfg.to_ray()
    assert isinstance(as_ray["train"], dict) and isinstance(as_ray["export_uri"], str)
    assert LoopConfig.from_ray(as_ray) == cfg



@pytest.mark.parametrize("export_uri", ["s3://bucket/run/.student.tmp-1", "/shared/run/.student.tmp-1"])
def test_rank_0_exports_through_a_folder_of_its_own_node(export_uri):
    cfg = LoopConfig(train=TrainConfig(), model_path="/m", total_steps=1, pad_token_id=2,
                     export_uri=export_uri, has_val=False, run_dir=export_uri.rsplit("/", 1)[0])
    assert cfg.export.uri == export_uri and not str(cfg.export_dir).startswith(("s3:", "/shared"))
    assert cfg.export_dir.is_absolute() and cfg.metrics_path.parent == cfg.export_dir
