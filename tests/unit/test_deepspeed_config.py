"""The DeepSpeed config and learning-rate schedule of the training loop (pure)."""

from __future__ import annotations

import pytest

from raydistill.config import TrainConfig
from raydistill.student.engine import deepspeed_config, lr_schedule


def settings(**overrides):
    return TrainConfig(**overrides)


def test_zero3_buffers_scale_with_the_model_and_stay_far_below_deepspeeds_defaults():
    small = deepspeed_config(settings(zero_stage=3), hidden_size=576)["zero_optimization"]
    large = deepspeed_config(settings(zero_stage=3), hidden_size=4096)["zero_optimization"]
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_max_live_parameters"):
        assert small[key] < large[key] < 5e8  # sized to the model; DeepSpeed's 5e8 is 2 GB of fp32 per rank
    assert small["stage3_prefetch_bucket_size"] <= small["reduce_bucket_size"]
    assert deepspeed_config(settings(zero_stage=3))["zero_optimization"] == {"stage": 3}  # no size: defaults


def test_zero3_reuse_distance_is_below_a_small_models_size():
    # SmolLM2-135M: above 2x its parameter count, ZeRO-3 would keep every gathered layer alive.
    zero = deepspeed_config(settings(zero_stage=3), hidden_size=576)["zero_optimization"]
    assert zero["stage3_max_reuse_distance"] < 134_515_008 / 10


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_other_stages_keep_deepspeed_defaults(stage):
    assert deepspeed_config(settings(zero_stage=stage), hidden_size=576)["zero_optimization"] == {"stage": stage}


def test_batch_accumulation_and_dtype():
    cfg = deepspeed_config(settings(batch_size_per_worker=4, gradient_accumulation_steps=3, dtype="bf16"))
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (4, 3)
    assert cfg["bf16"] == {"enabled": True}
    assert deepspeed_config(settings())["bf16"] == {"enabled": False}
    assert "optimizer" not in cfg  # a client AdamW: no DeepSpeed optimizer block to JIT-compile


def test_warmup_then_cosine_to_ten_percent():
    import torch

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    schedule = lr_schedule(optimizer, total_steps=100, warmup_ratio=0.1)
    rates = []
    for _ in range(101):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[0] < rates[5] < rates[10] == pytest.approx(2.0)  # warmup reaches the peak at step 10
    assert rates[100] == pytest.approx(0.2)  # 10% of the peak at the last step
    assert all(a >= b for a, b in zip(rates[10:101], rates[11:101]))  # and decays monotonically between
