"""Checkpoints of the training loop: each rank's DeepSpeed shard plus where the loop stood,
reported to Ray Train, which keeps them in run storage; and restoring from one."""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class LoopState:
    """Where the loop stood at a checkpoint (``loop_state.json`` beside the DeepSpeed state)."""

    step: int = 0
    epoch: int = 0
    tokens_worker: int = 0
    lora: bool = False  # LoRA checkpoints leave out the frozen base weights


def save_checkpoint(engine: Any, state: LoopState, metrics_path: Path, rank: int) -> Any:
    """Every rank writes its DeepSpeed shard into its own folder; Ray Train merges the folders
    of all ranks into one checkpoint in run storage. LoRA checkpoints skip the frozen base."""
    from ray.train import Checkpoint

    folder = Path(tempfile.mkdtemp(prefix="raydistill-ckpt-"))
    engine.save_checkpoint(str(folder), tag="ds", exclude_frozen_parameters=state.lora)
    if rank == 0:
        (folder / "loop_state.json").write_text(json.dumps(dataclasses.asdict(state)))
        if metrics_path.is_file():
            (folder / "metrics.jsonl").write_bytes(metrics_path.read_bytes())
    return Checkpoint.from_directory(str(folder))


def report_with_checkpoint(engine: Any, row: dict[str, Any], state: LoopState, metrics_path: Path, rank: int) -> None:
    """Report a metrics row to Ray Train together with a checkpoint of this step."""
    import ray.train

    saved = save_checkpoint(engine, state, metrics_path, rank)
    ray.train.report(row, checkpoint=saved)
    shutil.rmtree(saved.path, ignore_errors=True)  # persisted to run storage by now


def restore(engine: Any, checkpoint: Any, metrics_path: Path, rank: int) -> LoopState:
    """Load model, optimizer and scheduler state; return the loop state saved with them."""
    with checkpoint.as_directory() as folder:
        loaded, _ = engine.load_checkpoint(folder, tag="ds", load_module_strict=False)
        if loaded is None:
            raise RuntimeError(f"no DeepSpeed state in checkpoint {folder}; delete <run_dir>/ray_train to start over")
        state = LoopState(**json.loads(Path(folder, "loop_state.json").read_text()))
        if rank == 0 and Path(folder, "metrics.jsonl").is_file():
            metrics_path.write_bytes(Path(folder, "metrics.jsonl").read_bytes())
    return state
