"""Run by test_engine.py in its own process: a one-rank gloo group and a real DeepSpeed engine
from ``build_engine`` on the tiny model; prints the per-step losses, the ZeRO-3 partitions'
storage, and the losses after a checkpoint both in the saving engine and in a fresh one loaded
from it, as JSON. A separate process keeps torch.distributed's global group out of pytest's."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch

from raydistill.config import TrainConfig
from raydistill.student.engine import build_engine, skip_shm_comm_build
from raydistill.student.step import train_step


def main(model_path: str, stage: int, store: str) -> None:
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")  # DeepSpeed reads these
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    skip_shm_comm_build()
    torch.manual_seed(0)
    train = TrainConfig(method="full", zero_stage=stage, batch_size_per_worker=2, learning_rate=1e-3,
                        warmup_ratio=0.0)
    engine, _ = build_engine(model_path, train, total_steps=100)
    rng = np.random.default_rng(0)
    ids = [rng.integers(10, 1000, size=n).astype(np.int64) for n in (14, 11)]
    labels = [np.where(np.arange(len(x)) >= len(x) - 3, x, -100).astype(np.int64) for x in ids]
    batch = {"input_ids": np.array(ids, dtype=object), "labels": np.array(labels, dtype=object)}
    losses = [train_step(engine, batch, pad_id=0, kl_weight=0.0)[0] for _ in range(4)]
    opt = engine.optimizer
    shared = None
    if stage == 3:
        shared = [a.data_ptr() == b.data_ptr() for a, b in zip(opt.fp16_partitioned_groups_flat, opt.fp32_partitioned_groups_flat)]
    checkpoint = os.path.join(os.path.dirname(store), f"ckpt{stage}")
    engine.save_checkpoint(checkpoint, tag="ds")
    after_save = [train_step(engine, batch, pad_id=0, kl_weight=0.0)[0] for _ in range(2)]
    restored, _ = build_engine(model_path, train, total_steps=100)
    restored.load_checkpoint(checkpoint, tag="ds")
    after_load = [train_step(restored, batch, pad_id=0, kl_weight=0.0)[0] for _ in range(2)]
    print(json.dumps({"losses": losses, "shared": shared, "after_save": after_save, "after_load": after_load}))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
