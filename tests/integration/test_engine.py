"""The DeepSpeed engine the loop builds, one rank, real DeepSpeed: ZeRO-3's fp32 master
partition shares the model partition's storage, still trains exactly like ZeRO-0, and resumes
from a checkpoint exactly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

CHILD = Path(__file__).with_name("engine_child.py")


def run_engine(model: str, stage: int, tmp_path: Path) -> dict:
    proc = subprocess.run([sys.executable, str(CHILD), model, str(stage), str(tmp_path / f"store{stage}")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_zero3_shares_the_fp32_master_and_trains_like_zero0(tiny_model, tmp_path):
    zero0, zero3 = run_engine(tiny_model, 0, tmp_path), run_engine(tiny_model, 3, tmp_path)
    assert zero3["shared"] and all(zero3["shared"])  # DeepSpeed 0.19 alone keeps a second fp32 copy
    assert zero3["losses"] == pytest.approx(zero0["losses"], rel=1e-4)
    assert zero0["losses"][-1] < zero0["losses"][0] - 0.1  # the same batch four times: it learns
    for run in (zero0, zero3):  # a fresh engine loaded from the checkpoint continues the same losses
        assert run["after_load"] == pytest.approx(run["after_save"], rel=1e-5)
        assert run["after_save"][0] < run["losses"][-1]
