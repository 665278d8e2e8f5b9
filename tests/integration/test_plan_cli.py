"""`raydistill plan` for every shipped config, and against a Ray cluster with logical GPUs: a
config that fits plans, an oversized one is refused naming the missing resource."""

import contextlib
import io
import subprocess
import sys
from pathlib import Path

import pytest

from raydistill.cli import main

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "jobs" / "configs").glob("*.yaml"))

pytestmark = pytest.mark.integration

# A 2-node H100 cluster in miniature: logical resources only, so nothing runs on them. One Ray
# start, then the config as shipped and an oversized variant.
CHECK = """
import sys, ray
from raydistill.config import load_config
from raydistill.errors import ConfigError
from raydistill.plan import run_plan
ray.init(address="local", num_cpus=64, num_gpus=16, resources={"accelerator_type:H100": 1},
         include_dashboard=False, _node_ip_address="127.0.0.1")
for overrides in ([], ["train.num_workers=32"]):
    print("=== overrides", overrides, flush=True)
    try:
        run_plan(load_config(sys.argv[1], overrides))
    except ConfigError as exc:
        print("REFUSED", exc, flush=True)
"""


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_plans(config):
    out, err = io.StringIO(), io.StringIO()  # the CLI's main, in this process (no Ray starts)
    with contextlib.chdir(REPO), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["plan", str(config)])
    assert code == 0, err.getvalue()[-2000:]
    assert "what each stage asks of Ray" in out.getvalue() and "time (estimate)" in out.getvalue()


def test_cluster_check_accepts_a_fitting_config_and_refuses_an_oversized_one():
    gpu = str(REPO / "jobs" / "configs" / "gpu_qwen3_moe.yaml")
    proc = subprocess.run([sys.executable, "-c", CHECK, gpu], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    fits, big = proc.stdout.split("=== overrides")[1:]
    assert "the cluster has the resources for every stage" in fits and "REFUSED" not in fits, fits
    assert "REFUSED the cluster cannot run this config: train needs 128 CPU in all" in big, big
