"""Connecting to Ray: a cluster when RAY_ADDRESS / cluster.address says so, else a local one on loopback."""

from __future__ import annotations

import logging
import os
from typing import Any

from raydistill.config import ClusterConfig, PipelineConfig
from raydistill.engine import CPU_ENGINE_ENV
from raydistill.errors import DataError, RunDirError
from raydistill.progress import quiet_driver_notices, quiet_ray_driver, verbose
from raydistill.storage import Location, location

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


_started_local = False  # whether init_ray started, in this process, the Ray it uses


def started_local_ray() -> bool:
    return _started_local


# Ray ends an idle worker process 1 s after its task when more than num_cpus are up, so each
# Ray Data stage (several tasks at once) starts new Python processes, each importing pyarrow,
# transformers or torch again: seconds each on a 2-core machine, minutes under load. Kept for
# a minute, they are reused (a Ray Data training-set build here: 34 → 18 worker starts).
# Ray also runs its workers at nice 15, to keep its own daemons responsive on a shared node; on
# one machine the workers (the engines, training) are the run, and at nice 15 any other busy
# process takes the CPU from them: beside one `yes`, two small Ray Data tests took 72-85 s at
# nice 15 and 62-66 s at nice 0 (2-core host, docs/testing.md).
LOCAL_SYSTEM_CONFIG = {"idle_worker_killing_time_threshold_ms": 60_000, "worker_niceness": 0}

START_ATTEMPTS = 3  # a local Ray node that times out in start-up is started again, this many times in all


def init_ray(cluster: ClusterConfig) -> Any:
    """ray.init once per process; never attaches to a cluster that nobody asked for."""
    global _started_local
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
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                ray.init(
                    address="local",
                    num_cpus=cluster.num_cpus,
                    include_dashboard=False,
                    _node_ip_address="127.0.0.1",
                    runtime_env={"env_vars": local_worker_env(local_gpu_count())},
                    log_to_driver=log_to_driver,
                    _system_config=LOCAL_SYSTEM_CONFIG,
                )
                break
            except Exception as exc:
                # Ray waits a fixed 30 s for its raylet to register; a loaded machine (several Ray
                # clusters starting at once) can take longer. The node is torn down and started again.
                if "timed out during startup" not in str(exc) or attempt == START_ATTEMPTS:
                    raise
                logger.warning("the local Ray node did not start within Ray's 30 s (attempt %d of %d); starting "
                               "it again", attempt, START_ATTEMPTS)
                ray.shutdown()
        _started_local = True
    quiet_ray_driver()
    if not log_to_driver:
        logger.info("Ray workers' logs (engines, training, serving): %s (raydistill -v shows them here)", ray_logs_dir())
    return ray


def connect(cfg: PipelineConfig) -> Any:
    """``init_ray`` and, on a cluster, the check that every node sees the run directory."""
    ray = init_ray(cfg.cluster)
    check_shared_storage(location(cfg.run_dir))
    return ray


_SHARED: set[str] = set()  # run directories already checked by this process


def _probe(uri: str, token: str) -> str | None:
    """On one node: None when it reads the driver's marker, else what went wrong."""
    try:
        return None if Location(uri).read_text() == token else "it reads another file there"
    except FileNotFoundError:
        return "it does not see the file"
    except Exception as exc:  # noqa: BLE001 - any failure to read is the answer
        return str(exc).splitlines()[0][:200]


def nodes_to_check() -> list[dict[str, Any]]:
    """The alive nodes whose view of files may differ from the driver's: none for the one-node
    local Ray this process started, every node of a cluster it attached to."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return [] if _started_local and len(nodes) <= 1 else nodes


def on_every_node(nodes: list[dict[str, Any]], fn: Any, *args: Any) -> dict[str, Any]:
    """``fn(*args)`` as a task pinned to each node (no CPU asked: it runs on a head with none
    too): ``"<ip> <node id>"`` → its result."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task: Any = ray.remote(num_cpus=0, max_retries=0)(fn)
    refs = {f"{n['NodeManagerAddress']} {n['NodeID'][:8]}": task.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(*args) for n in nodes}
    return dict(zip(refs, ray.get(list(refs.values()), timeout=900)))


def check_shared_storage(run: Location) -> None:
    """Refuse, before any work, a run directory that some node of the cluster cannot read: the
    driver writes a marker file there and a task on every alive node reads it back. A local
    folder on a cluster of several machines fails here (each node has its own disk) instead of
    scattering the artifacts; an object store checks every node's credentials and endpoint.
    A local Ray started by this process is one node on this machine: nothing to check."""
    import uuid

    if run.uri in _SHARED:
        return
    nodes = nodes_to_check()
    if not nodes:
        _SHARED.add(run.uri)
        return
    token = uuid.uuid4().hex
    marker = run / f".raydistill-probe-{token[:12]}"
    marker.write_text(token)  # on an object store: the driver's own credentials, endpoint and bucket
    try:
        failed = {node: why for node, why in on_every_node(nodes, _probe, marker.uri, token).items() if why}
    finally:
        marker.delete()
    if failed:
        node, why = next(iter(failed.items()))
        if run.remote:
            raise RunDirError(f"run_dir {run.uri!r}: {len(failed)} of {len(nodes)} Ray nodes cannot read it (node {node}: "
                              f"{why}); give every node the same endpoint and credentials (runtime_env env_vars, a "
                              f"service account or instance role)")
        raise RunDirError(f"run_dir {run.uri!r} is on this machine's disk, which {len(failed)} of the cluster's "
                          f"{len(nodes)} Ray nodes do not see (node {node}: {why}); use object storage "
                          f"(run_dir=s3://bucket/run) or a folder every node mounts (e.g. /mnt/shared/run)")
    _SHARED.add(run.uri)


def check_written(stage: str, written: int, listed: int, folder: Location) -> None:
    """A stage's own counts must agree: the rows Ray Data wrote and the rows the driver reads back."""
    if written != listed:
        raise DataError(f"{stage}: Ray wrote {written} rows but {listed} are readable in {folder.uri!r}; the run "
                        f"directory is not the same storage on every node: use object storage or a shared mount")


def ray_logs_dir() -> str:
    """Where this Ray session writes its workers' logs."""
    try:
        from ray._private.worker import _global_node

        # ray declares `_global_node = None` (so mypy infers None); ray.init sets it to the session's Node
        node: Any = _global_node
        return node.get_logs_dir_path()
    except (ImportError, AttributeError):  # a private API: the path is only a hint
        return "the Ray session's logs folder (/tmp/ray/session_latest/logs on the head node)"
