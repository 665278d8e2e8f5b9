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
