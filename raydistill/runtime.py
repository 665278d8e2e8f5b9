"""Connecting to Ray: a cluster when RAY_ADDRESS / cluster.address says so, else a local one on loopback."""

from __future__ import annotations

import logging
import os
from typing import Any

from raydistill.config import ClusterConfig
from raydistill.engine import CPU_ENGINE_ENV
from raydistill.progress import quiet_driver_notices, quiet_ray_driver, verbose

logger = logging.getLogger(__name__)

# Environment every Ray worker of a local CPU run gets (vLLM and DeepSpeed facts measured here).
CPU_WORKER_ENV = {
    "DS_ACCELERATOR": "cpu",
    "TOKENIZERS_PARALLELISM": "false",
    **CPU_ENGINE_ENV,
    "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"),
}


def local_worker_env(num_gpus: int) -> dict[str, str]:
    """The workers' environment for a local Ray: on a workstation with a GPU, DeepSpeed must pick
    CUDA itself, so ``DS_ACCELERATOR=cpu`` (which would train on the CPU) is left out."""
    if num_gpus > 0:
        return {k: v for k, v in CPU_WORKER_ENV.items() if k != "DS_ACCELERATOR"}
    return dict(CPU_WORKER_ENV)


def local_gpu_count() -> int:
    """GPUs this machine has, as torch sees them (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def init_ray(cluster: ClusterConfig) -> Any:
    """ray.init once per process; never attaches to a cluster that nobody asked for."""
    import ray

    if ray.is_initialized():
        return ray
    address = cluster.address or os.environ.get("RAY_ADDRESS")
    # Quiet by default: the workers' output (vLLM, DeepSpeed, Ray Train) stays in Ray's log files
    # instead of flooding the terminal; the stages log their own progress. `-v` streams it all.
    log_to_driver = verbose()
    quiet_driver_notices()
    if address:
        logger.info("connecting to Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=log_to_driver)
    else:
        logger.info("starting a local Ray cluster on 127.0.0.1 (%s logical CPUs)", cluster.num_cpus)
        ray.init(
            address="local",
            num_cpus=cluster.num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            runtime_env={"env_vars": local_worker_env(local_gpu_count())},
            log_to_driver=log_to_driver,
        )
    quiet_ray_driver()
    if not log_to_driver:
        logger.info("Ray workers' logs (engines, training, serving): %s (raydistill -v shows them here)", ray_logs_dir())
    return ray


def ray_logs_dir() -> str:
    """Where this Ray session writes its workers' logs."""
    try:
        from ray._private.worker import _global_node

        # ray declares `_global_node = None` (so mypy infers None); ray.init sets it to the session's Node
        node: Any = _global_node
        return node.get_logs_dir_path()
    except (ImportError, AttributeError):  # a private API: the path is only a hint
        return "the Ray session's logs folder (/tmp/ray/session_latest/logs on the head node)"
