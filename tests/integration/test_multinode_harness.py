"""Smoke test of tests/integration/multinode.py: a real head + worker node with a private disk, and
an S3 server, on this machine; a driver in this process attaches with ray.init(address=...)."""

from __future__ import annotations

import os
from unittest import mock

import pytest
from multinode import PRIVATE_RESOURCE, cluster, moto_s3  # tests/integration is on sys.path (rootdir-relative)

pytestmark = pytest.mark.integration
BUCKET = "harness"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """(cluster, s3, private dir): one cluster for the module, this process its driver."""
    import ray

    tmp = tmp_path_factory.mktemp("multinode")
    private = tmp / "private"
    private.mkdir()
    (private / "driver.txt").write_text("written by the driver")
    with moto_s3(tmp) as s3, cluster(tmp, private=[private], env={**s3.env, "RAYDISTILL_HARNESS_PROBE": "1"}) as c:
        s3.create_bucket(BUCKET)
        if ray.is_initialized():  # another module's in-process Ray (its fixtures are done with it)
            ray.shutdown()
        with mock.patch.dict(os.environ, c.env):
            ray.init(address=c.gcs_address, log_to_driver=False)
            try:
                yield c, s3, private
            finally:
                ray.shutdown()


def test_two_alive_nodes_all_cpus_on_the_worker(env):
    c, _, _ = env
    nodes = c.nodes()
    assert len(nodes) == 2
    (head,) = [n for n in nodes if n["is_head_node"]]
    (worker,) = [n for n in nodes if not n["is_head_node"]]
    assert "CPU" not in head["resources_total"]
    assert worker["resources_total"]["CPU"] == 4 and worker["resources_total"][PRIVATE_RESOURCE] == 100


def test_worker_has_its_own_disk_and_environment(env):
    import ray

    c, s3, private = env

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


def test_worker_writes_to_s3_with_environment_only(env):
    import pyarrow.fs as pafs
    import ray

    _, s3, _ = env

    @ray.remote(resources={PRIVATE_RESOURCE: 1})
    def put(uri: str) -> None:
        fs, path = pafs.FileSystem.from_uri(uri)  # the endpoint from AWS_ENDPOINT_URL alone
        with fs.open_output_stream(path) as f:
            f.write(b"from the worker")

    ray.get(put.remote(f"s3://{BUCKET}/objects/hello.txt"))
    # the driver: through the environment (the fixture put s3.env in it), and through an explicit filesystem
    fs, path = pafs.FileSystem.from_uri(f"s3://{BUCKET}/objects/hello.txt")
    for filesystem in (fs, s3.filesystem()):
        with filesystem.open_input_stream(path) as f:
            assert f.read() == b"from the worker"


def test_ray_data_writes_parquet_to_s3(env):  # `env`: this driver is connected
    import pyarrow.parquet as pq
    import ray

    ray.data.range(100).write_parquet(f"s3://{BUCKET}/ds")
    table = pq.read_table(f"s3://{BUCKET}/ds")
    assert sorted(table.column("id").to_pylist()) == list(range(100))
