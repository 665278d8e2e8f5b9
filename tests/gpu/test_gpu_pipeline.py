"""The GPU path end to end, for a machine with a CUDA GPU (skipped elsewhere: nothing here can
run without one). `jobs/configs/gpu_single.yaml` shrunk to SmolLM2-135M and a few hundred
queries: vLLM on the GPU through ray.data.llm, Ray Train + DeepSpeed on the GPU, the two Serve
engines sharing it, the report. Needs the GPU stack (`pip install -c constraints-gpu.txt -e
".[gpu,dev]"`).

    pytest tests/gpu -m gpu -v            # ~5 min on one GPU
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the GPU tier)")]


def test_single_gpu_config_runs_end_to_end(tmp_path):
    overrides = [
        f"run_dir={tmp_path / 'run'}",
        "task.name=langid-long",
        "teacher.model=builtin:smollm2-135m-instruct", "train.student_model=builtin:smollm2-135m-instruct",
        "teacher.max_rows=256", "teacher.max_model_len=2048", "serve.max_model_len=2048",
        "train.batch_size_per_worker=16", "train.max_seq_len=256", "train.cpus_per_worker=1",
        "eval.max_rows=64", "serve.port=8765",
    ]
    proc = subprocess.run([sys.executable, "-m", "raydistill", "run", str(REPO / "jobs" / "configs" / "gpu_single.yaml"),
                           *overrides], cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = tmp_path / "run"
    train = json.loads((run / "student" / "_manifest.json").read_text())
    assert train["counts"]["last_loss"] < train["counts"]["first_loss"]
    payoff = json.loads((run / "eval" / "_manifest.json").read_text())["metrics"]["payoff"]
    assert payoff["input_tokens_teacher_over_student"] > 5 and payoff["teacher_parse_rate"] > 0.9
    assert "Student–teacher agreement" in proc.stdout
