"""What the driver hands every Ray Train worker: the train section plus what it resolved."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from raydistill.config import TrainConfig
from raydistill.storage import Location


class LoopConfig(BaseModel):
    """The one config of ``train_loop_per_worker``, built by ``student.train``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    train: TrainConfig = Field(description="The run's train section.")
    model_path: str = Field(description="Local folder of the student's starting weights (resolved by the driver).")
    total_steps: int = Field(ge=1, description="Optimizer steps to take (the driver's plan).")
    pad_token_id: int = Field(description="Token id that right-pads a micro-batch (the tokenizer's pad, else its EOS).")
    export_uri: str = Field(description="The staged student folder in run storage (a local path or a URI): "
                            "adapter/, merged/, metrics.jsonl, train_summary.json.")
    has_val: bool = Field(description="Whether a validation split ('val' dataset) exists for the eval loss.")
    mlflow_tracking_uri: str | None = Field(None, description="MLflow store when train.tracking=mlflow.")
    run_dir: str = Field(description="The run folder (tagged on the MLflow run).")
    tasks: list[str] = Field(default_factory=list, description="Task keys; with several, the eval loss is also per task.")
    sft_steps: int | None = Field(None, ge=0, description="Of total_steps, the off-policy ones (on the teacher's "
                                  "samples; None: all); the rest are on-policy (train.on_policy).")
    on_policy_queries: str | None = Field(None, description="The on-policy query file (token ids) in run storage.")
    engines_key: str | None = Field(None, description="Names the on-policy engines' actors (on_policy_engines).")

    @property
    def off_policy_steps(self) -> int:
        return self.total_steps if self.sft_steps is None else self.sft_steps

    @property
    def export(self) -> Location:
        return Location(self.export_uri)

    @property
    def export_dir(self) -> Path:
        """Where rank 0 writes the student and its metrics: a folder on its own node, moved into
        run storage at the end (``metrics.jsonl`` copied there every ``METRICS_SYNC_S`` too, for
        the driver's progress line): rank 0 runs on any node, not necessarily one that sees a
        local run directory's disk."""
        key = hashlib.sha256(self.export_uri.encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"raydistill-export-{key}"

    @property
    def metrics_path(self) -> Path:
        return self.export_dir / "metrics.jsonl"

    def to_ray(self) -> dict[str, Any]:
        """Ray Train takes ``train_loop_config`` as a dict: plain JSON values, read back by ``from_ray``."""
        return self.model_dump(mode="json")

    @classmethod
    def from_ray(cls, config: dict[str, Any]) -> LoopConfig:
        return cls.model_validate(config)
