"""`raydistill plan` for every shipped config, and against a Ray cluster with logical GPUs: a
config that fits plans, an oversized one is refused naming the missing resource."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "jobs" / "configs").glob("*.yaml"))

pytestmark = pytest.mark.integration

# A 2-node H100 cluster in miniature: logical resources only, so nothing runs on them.
CHECK = """
import sys, ray
from raydistill.config import load_config
from raydistill.errors import ConfigError
from raydistill.plan import run_plan
ray.init(address="local", num_cpus=64, num_gpus=16, resources={"accelerator_type:H100": 1},
         include_dashboard=False, _node_ip_address="127.0.0.1")
try:
    run_plan(load_config(sys.argv[1], sys.argv[2:]))
except ConfigError as exc:
    print("REFUSED", exc)
"""


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_plans(config):
    proc = subprocess.run([sys.executable, "-m", "raydistill", "plan", str(config)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "what each stage asks of Ray" in proc.stdout and "time (estimate)" in proc.stdout


def test_cluster_check_accepts_a_fitting_config_and_refuses_an_oversized_one():
    gpu = str(REPO / "jobs" / "configs" / "gpu_qwen3_moe.yaml")
    fits = subprocess.run([sys.executable, "-c", CHECK, gpu], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert fits.returncode == 0 and "the cluster has the resources for every stage" in fits.stdout, fits.stdout + fits.stderr[-2000:]
    big = subprocess.run([sys.executable, "-c", CHECK, gpu, "train.num_workers=32"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert "REFUSED the cluster cannot run this config: train needs 128 CPU in all" in big.stdout, big.stdout + big.stderr[-2000:]
