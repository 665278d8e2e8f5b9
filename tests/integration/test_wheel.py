"""A wheel built from the repository works on its own: the demo's config, the built-in tasks (with
their demonstrations) and `raydistill plan` come from the installed package, not the checkout."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


def test_wheel_installs_and_plans_the_demo_outside_the_checkout(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("raydistill-*.whl"))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    config = site / "raydistill" / "configs" / "demo_cpu.yaml"
    assert config.is_file() and not config.is_symlink()
    assert config.read_text() == (REPO / "jobs" / "configs" / "demo_cpu.yaml").read_text()

    def cli(*args: str) -> subprocess.CompletedProcess:
        # the wheel's package first on the path; the dependencies from this environment
        env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
        return subprocess.run([sys.executable, "-m", "raydistill", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)

    where = subprocess.run([sys.executable, "-c", "import raydistill; print(raydistill.__file__)"], cwd=tmp_path,
                           env={"PYTHONPATH": str(site)}, capture_output=True, text=True, check=True)
    assert where.stdout.startswith(str(site))
    assert cli("demo", "--help").returncode == 0
    planned = cli("demo", "--dry-run")  # the demo's config and langid-long's demonstrations, from the wheel
    assert planned.returncode == 0, planned.stderr[-2000:]
    assert "plan for run_dir runs/demo (task langid-long)" in planned.stdout
    assert "input tokens per request: teacher 1," in planned.stdout  # the long prompt: demonstrations loaded
