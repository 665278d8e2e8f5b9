"""How a local Ray is started: the workers' environment depends on whether the machine has a GPU."""

import pytest

from raydistill import runtime
from raydistill.config import ClusterConfig


@pytest.mark.parametrize("gpus", [0, 1])
def test_local_ray_workers_train_on_the_gpu_when_there_is_one(monkeypatch, gpus):
    import ray

    seen = {}
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr(runtime, "local_gpu_count", lambda: gpus)
    runtime.init_ray(ClusterConfig())
    env = seen["runtime_env"]["env_vars"]
    assert seen["address"] == "local" and seen["_node_ip_address"] == "127.0.0.1"
    assert env.get("DS_ACCELERATOR") == (None if gpus else "cpu")  # DeepSpeed picks CUDA itself
    assert env["TOKENIZERS_PARALLELISM"] == "false"


@pytest.mark.parametrize("failures,started", [(0, True), (2, True), (3, False)])
def test_a_local_node_that_times_out_in_start_up_is_started_again(monkeypatch, failures, started):
    import ray

    calls = {"init": 0, "shutdown": 0}

    def init(**kwargs):
        calls["init"] += 1
        if calls["init"] <= failures:
            raise Exception("The current node timed out during startup. This could happen because ...")

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: calls.__setitem__("shutdown", calls["shutdown"] + 1))
    monkeypatch.setattr(runtime, "local_gpu_count", lambda: 0)
    if started:
        runtime.init_ray(ClusterConfig())
    else:
        with pytest.raises(Exception, match="timed out during startup"):
            runtime.init_ray(ClusterConfig())
    assert calls == {"init": min(failures + 1, runtime.START_ATTEMPTS), "shutdown": min(failures, runtime.START_ATTEMPTS - 1)}


def test_other_start_failures_are_not_retried(monkeypatch):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: (_ for _ in ()).throw(ValueError("bad num_cpus")))
    monkeypatch.setattr(runtime, "local_gpu_count", lambda: 0)
    with pytest.raises(ValueError, match="bad num_cpus"):
        runtime.init_ray(ClusterConfig())
