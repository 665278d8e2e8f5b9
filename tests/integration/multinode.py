"""A real two-node Ray cluster with a private disk on its worker, and an S3-compatible server, all
on this one machine: the harness for end-to-end tests of what a cluster of separate machines sees.

    with moto_s3(tmp) as s3, cluster(tmp, private=[run_dir], env=s3.env) as c:
        s3.create_bucket("bucket")
        ... ray.init(address=c.gcs_address) / `ray job submit --address c.dashboard_url` with env=c.env ...

``cluster`` starts a head with ``--num-cpus=0`` (as KubeRay heads are), so every task and actor that
needs a CPU lands on the one worker node, which carries the custom resource ``private_node`` too. The
worker's ``ray start`` runs inside its own mount namespace (``unshare --mount --propagation
private``) in which an empty tmpfs is mounted over each ``private`` path, over its own HOME (with
XDG_CACHE_HOME and RAYDISTILL_CACHE under it) and over Ray's temp dir: files the test or the driver
write there are invisible to the worker's processes, and what those write is invisible to everyone
else (``Cluster.worker_view(path)`` reads it through /proc while the worker runs). The mounts vanish
with the namespace when its last process exits; teardown checks that none is left.

Facts measured here (Ray 2.60, pyarrow 26.0.1, moto 5.2.5, as root inside scripts/loopback-only):

- pyarrow's S3 filesystem honours ``AWS_ENDPOINT_URL`` from the environment, ``http://`` scheme
  included: ``pyarrow.fs.FileSystem.from_uri("s3://bucket/x")`` reaches moto with environment
  variables only (no ``endpoint_override`` / ``scheme`` query parameters needed), and so do Ray Data's
  ``write_parquet("s3://...")`` / ``read_parquet`` and Ray Train's ``RunConfig(storage_path="s3://...")``,
  which resolve their filesystems from the URI. ``AWS_EC2_METADATA_DISABLED=true`` spares the SDK
  its instance-metadata probe. An explicit equivalent, for code that builds the filesystem itself:
  ``pyarrow.fs.S3FileSystem(endpoint_override="127.0.0.1:PORT", scheme="http", access_key=...,
  secret_key=..., region=...)``, or the URI ``s3://bucket/x?endpoint_override=127.0.0.1:PORT&scheme=http``.
- Ray worker processes inherit their raylet's environment: variables given to ``ray start`` (here
  ``env``) are seen by tasks and actors on that node without any runtime env.
- Ray's temp dir: the head gets a short one of its own (``/tmp/rmn-XXXXXX``: Unix socket paths
  under it must stay below 108 bytes, so pytest's long tmp paths will not do), so its session and
  logs are this cluster's alone even when other clusters run on the machine. A node that joins
  without ``--temp-dir`` takes the head's temp dir from the GCS, so the worker mounts its private
  tmpfs over that same path: both nodes use one path, each its own files (sockets, logs, spilled
  objects, runtime-env downloads), as two machines would.
- Every node port is chosen free (several nodes share one network namespace: the dashboard agent's
  default 52365 would clash) and worker ports are left to the OS (``--min/max-worker-port=0``, as
  ray.cluster_utils does).
- A driver on this machine (``ray.init(address=c.gcs_address)``) attaches to the head's raylet: Ray
  prefers the head among several nodes on one IP address. It needs ``RAY_AUTH_MODE=disabled`` like
  the nodes (see tests/integration/test_pipeline.py's ``ray_head``); ``Cluster.env`` has it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from raydistill.runtime import CPU_WORKER_ENV

VENV_BIN = str(Path(sys.executable).parent)
PRIVATE_RESOURCE = "private_node"
# what every worker node of the CPU tests gets (raydistill.runtime's worker env, and a sized KV cache)
CPU_NODE_ENV = {**CPU_WORKER_ENV, "VLLM_CPU_KVCACHE_SPACE": "1"}
# a node's own: never handed from the test process to the worker node (a separate machine would not
# have them); AWS_* come only from ``env``
_HOST_ONLY = ("RAY_ADDRESS", "HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_RUNTIME_DIR",
              "RAYDISTILL_CACHE", "HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE",
              "TORCH_HOME", "TORCH_EXTENSIONS_DIR", "TRITON_CACHE_DIR", "VLLM_CACHE_ROOT", "PYTHONPATH")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError as e:
        return f"({e})"


def _session_pids(sid: int) -> list[int]:
    """The live processes of session ``sid``: a ``start_new_session`` child and all it started, Ray
    workers included (the raylet puts each worker in a process group of its own, not a session of
    its own). Zombies are left out: they hold nothing, and whoever reaps them is not ours."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                if fields[0] != "Z" and int(fields[3]) == sid:
                    pids.append(int(entry))
    return pids


def _pids_in_mount_ns(ns: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{entry}/ns/mnt") == ns:
                    pids.append(int(entry))
    return pids


def _stop_session(proc: subprocess.Popen, term_wait: float = 40, wait: float = 10) -> list[int]:
    """End a child started with ``start_new_session`` and every process of its session: SIGTERM to
    the leader first (`ray start --block` then ends the processes it started), then SIGTERM and
    SIGKILL to whatever is left in the session. Returns the pids that outlived SIGKILL (normally none)."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=term_wait)
    left = _session_pids(proc.pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + wait
        while (left := _session_pids(proc.pid)) and time.time() < deadline:
            proc.poll()  # reaps the leader
            time.sleep(0.2)
        if not left:
            break
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=wait)
    return left


# ---------------------------------------------------------------------------------------------
# S3


@dataclass
class S3:
    """A moto S3 server on 127.0.0.1: ``env`` is all a process (or a Ray node) needs to reach it."""

    endpoint_url: str
    env: dict[str, str]
    log: Path

    @property
    def endpoint(self) -> str:
        """``host:port``, as pyarrow's ``endpoint_override`` takes it."""
        return self.endpoint_url.split("://", 1)[1]

    def create_bucket(self, name: str) -> str:
        """Create a bucket (3-63 characters); returns ``s3://name``."""
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.env["AWS_DEFAULT_REGION"],
                     aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=name)
        return f"s3://{name}"

    def filesystem(self):
        """An explicit pyarrow S3FileSystem for this server (``FileSystem.from_uri`` with ``env`` in
        the environment resolves an equivalent one)."""
        from pyarrow import fs

        return fs.S3FileSystem(endpoint_override=self.endpoint, scheme="http", region=self.env["AWS_DEFAULT_REGION"],
                               access_key=self.env["AWS_ACCESS_KEY_ID"], secret_key=self.env["AWS_SECRET_ACCESS_KEY"])


@contextlib.contextmanager
def moto_s3(tmp: Path, *, region: str = "us-east-1", deadline_s: float = 180) -> Iterator[S3]:
    """``python -m moto.server`` on 127.0.0.1 and a free port, as a child in a session of its own (log in
    ``tmp/moto.log``); ended at exit. Its buckets live in memory. Give ``S3.env`` to ``cluster(env=...)``."""
    import requests

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": region, "AWS_REGION": region, "AWS_EC2_METADATA_DISABLED": "true",
    }
    log_path = tmp / "moto.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={k: v for k, v in os.environ.items() if not k.startswith("AWS_")})
    try:
        deadline = time.time() + deadline_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto server exited {proc.returncode}: {_tail(log_path)}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{url}/moto-api/", timeout=5).status_code == 200:
                    break
            if time.time() > deadline:
                raise RuntimeError(f"moto server did not answer on {url} in {deadline_s:.0f} s: {_tail(log_path)}")
            time.sleep(0.5)
        yield S3(url, env, log_path)
    finally:
        _stop_session(proc, term_wait=10)


# ---------------------------------------------------------------------------------------------
# Ray cluster


@dataclass
class Cluster:
    gcs_address: str  # "127.0.0.1:PORT": ray.init(address=...), RAY_ADDRESS
    dashboard_url: str  # "http://127.0.0.1:PORT": the job and state APIs (`ray job submit --address`)
    # for clients on this machine: this environment less AWS_*, the venv's bin first on PATH,
    # RAY_AUTH_MODE=disabled, RAY_ADDRESS=gcs_address, then ``env``
    env: dict[str, str]
    temp_dir: Path  # Ray's temp dir: the head's files here, the worker's own tmpfs at the same path
    worker_home: Path  # the worker node's HOME (a tmpfs there; an empty folder here)
    private: list[Path]  # the private paths as given, resolved (each an empty tmpfs on the worker)
    head_log: Path  # the head's `ray start` output
    worker_log: Path  # the worker's
    worker_pid: int = 0  # the worker's `ray start`, inside its mount namespace
    worker_mount_ns: str = ""
    _procs: list[subprocess.Popen] = field(default_factory=list, repr=False)

    def worker_view(self, path: str | os.PathLike) -> Path:
        """``path`` as the worker node sees it, through /proc/PID/root (only while the worker runs)."""
        return Path(f"/proc/{self.worker_pid}/root") / Path(path).resolve().relative_to("/")

    def nodes(self) -> list[dict]:
        """The alive nodes, from the dashboard's state API (``node_id``, ``is_head_node``,
        ``resources_total``, ...)."""
        import requests

        reply = requests.get(f"{self.dashboard_url}/api/v0/nodes", params={"limit": 100}, timeout=10)
        reply.raise_for_status()
        rows = reply.json()["data"]["result"]["result"]
        return [n for n in rows if n.get("state") == "ALIVE"]

    def logs(self, n: int = 3000) -> str:
        """The tails of both nodes' `ray start` output and of their raylet logs (and the GCS's errors)."""
        parts = [f"--- head `ray start`:\n{_tail(self.head_log, n)}",
                 f"--- worker `ray start`:\n{_tail(self.worker_log, n)}"]
        head_logs = self.temp_dir / "session_latest" / "logs"
        sources = [("head", head_logs)] + ([("worker", self.worker_view(head_logs))] if self.worker_pid else [])
        for who, logs in sources:
            for name in ("raylet.err", "raylet.out", "gcs_server.err"):
                with contextlib.suppress(OSError):
                    if (logs / name).is_file():
                        parts.append(f"--- {who} {name}:\n{_tail(logs / name, n)}")
        return "\n".join(parts)


def _node_ports() -> list[str]:
    # several nodes share one network namespace: no fixed default port (the dashboard agent's 52365)
    return [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
            "--min-worker-port=0", "--max-worker-port=0"]


@contextlib.contextmanager
def cluster(tmp: Path, *, worker_cpus: int = 4, worker_gpus: int = 0, private: Iterable[str | os.PathLike] = (),
            env: Mapping[str, str] | None = None, worker_resources: Mapping[str, float] | None = None,
            object_store_bytes: int = 512 * 1024**2, deadline_s: float = 600) -> Iterator[Cluster]:
    """A head (``--num-cpus=0``, dashboard on) and one worker node (``worker_cpus`` CPUs,
    ``worker_gpus`` GPUs, resources ``{"private_node": 100, **worker_resources}``) whose mount
    namespace has an empty tmpfs over each ``private`` path, over its HOME (``tmp/worker-home``) and
    over Ray's temp dir. ``env`` goes to both nodes' raylets, so to every Ray worker process, and into
    ``Cluster.env``; the worker node gets ``CPU_NODE_ENV`` under it and its own HOME, XDG_CACHE_HOME
    and RAYDISTILL_CACHE over it, and none of this machine's cache variables (``_HOST_ONLY``).
    Ready when the dashboard lists both nodes alive (at most ``deadline_s``; else RuntimeError with
    the nodes' logs). Logs: ``tmp/ray-head.log``, ``tmp/ray-worker.log``."""
    import requests

    extra = dict(env or {})
    private_paths = [Path(p).resolve() for p in private]
    temp_dir = Path(tempfile.mkdtemp(prefix="rmn-", dir="/tmp"))  # short: Unix socket paths live under it
    worker_home = (tmp / "worker-home").resolve()
    gcs_port, dashboard_port = free_port(), free_port()
    gcs_address = f"127.0.0.1:{gcs_port}"
    host = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    host.update(PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0",
                # Ray 2.60 turns token auth on when ~/.ray/auth_token exists; these throwaway nodes
                # live in a loopback-only network namespace (test_pipeline.ray_head says more)
                RAY_AUTH_MODE="disabled",
                # a process that looks for "the" cluster (Ray Train's PlacementGroupCleaner, a bare
                # ray.init()) would otherwise find every GCS on the machine and give up; KubeRay sets it too
                RAY_ADDRESS=gcs_address)
    # on SIGTERM a node asks the GCS to drain it and waits up to 30 s for that (a head never
    # finishes): these throwaway nodes stop at once
    node = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    head_env = {**host, **node, **extra}
    worker_env = {**{k: v for k, v in host.items() if k not in _HOST_ONLY}, **node, **CPU_NODE_ENV, **extra,
                  "RAY_ADDRESS": gcs_address, "HOME": str(worker_home), "XDG_CACHE_HOME": str(worker_home / ".cache"),
                  "RAYDISTILL_CACHE": str(worker_home / ".cache" / "raydistill")}
    c = Cluster(gcs_address=gcs_address, dashboard_url=f"http://127.0.0.1:{dashboard_port}", env={**host, **extra},
                temp_dir=temp_dir, worker_home=worker_home, private=private_paths,
                head_log=tmp / "ray-head.log", worker_log=tmp / "ray-worker.log")
    ray = f"{VENV_BIN}/ray"
    head_cmd = [ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
                "--num-cpus=0", "--num-gpus=0", f"--temp-dir={temp_dir}", "--include-dashboard=true",
                "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                f"--ray-client-server-port={free_port()}", f"--object-store-memory={object_store_bytes}",
                *_node_ports(), "--disable-usage-stats"]
    resources = {PRIVATE_RESOURCE: 100, **(worker_resources or {})}
    # no --temp-dir: a joining node takes the head's, which is the worker's own tmpfs in its namespace
    worker_cmd = [ray, "start", f"--address={gcs_address}", "--block", "--node-ip-address=127.0.0.1",
                  f"--num-cpus={worker_cpus}", f"--num-gpus={worker_gpus}", f"--resources={json.dumps(resources)}",
                  f"--object-store-memory={object_store_bytes}", *_node_ports(), "--disable-usage-stats"]
    # parents first, so a private path above the temp dir or HOME does not hide their mounts; mkdir
    # makes the mount point on the shared filesystem (an empty folder there), the tmpfs is the namespace's
    mounts = sorted({str(temp_dir), str(worker_home), *map(str, private_paths)}, key=lambda m: len(Path(m).parts))
    script = " && ".join([f"mkdir -p {shlex.quote(m)} && mount -t tmpfs -o mode=0755 raydistill-private {shlex.quote(m)}"
                          for m in mounts]
                         + [f"mkdir -p {shlex.quote(str(worker_home / '.cache'))}", "exec " + shlex.join(worker_cmd)])
    try:
        with c.head_log.open("w") as log:
            c._procs.append(subprocess.Popen(head_cmd, stdout=log, stderr=subprocess.STDOUT, env=head_env,
                                             start_new_session=True))
        deadline = time.time() + deadline_s
        while True:  # the worker joins once the GCS answers
            _check_alive(c, deadline, "the head's GCS did not come up")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", gcs_port), timeout=2):
                break
            time.sleep(1)
        def start_worker() -> subprocess.Popen:
            with c.worker_log.open("a") as log:
                return subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                                        stdout=log, stderr=subprocess.STDOUT, env=worker_env, start_new_session=True)

        worker = start_worker()
        c._procs.append(worker)
        c.worker_pid = worker.pid
        own_ns = os.readlink("/proc/self/ns/mnt")
        starts = 1
        while True:
            if worker.poll() is not None and starts < NODE_STARTS and RAY_START_TIMEOUT in c.worker_log.read_text():
                # Ray waits a fixed 30 s for a raylet to register; on a loaded machine start it again
                starts += 1
                _stop_session(worker)  # whatever it left running in its session
                c._procs.remove(worker)
                worker = start_worker()
                c._procs.append(worker)
                c.worker_pid, c.worker_mount_ns = worker.pid, None
            _check_alive(c, deadline, "the cluster did not reach 2 alive nodes")
            if not c.worker_mount_ns:
                with contextlib.suppress(OSError):
                    if (ns := os.readlink(f"/proc/{worker.pid}/ns/mnt")) != own_ns:
                        c.worker_mount_ns = ns
            with contextlib.suppress(requests.RequestException, KeyError, ValueError):
                nodes = c.nodes()
                if len(nodes) == 2 and any(n.get("resources_total", {}).get(PRIVATE_RESOURCE) for n in nodes):
                    break
            time.sleep(2)
        yield c
    finally:
        for proc in reversed(c._procs):  # worker first
            _stop_session(proc)
        if c.worker_mount_ns:
            # the tmpfs mounts live as long as a process is in the namespace: wait for none to be left
            # (all are this harness's: only the worker's `ray start` and its descendants entered it)
            deadline = time.time() + 30
            while (left := _pids_in_mount_ns(c.worker_mount_ns)) and time.time() < deadline:
                for pid in left:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.5)
            if left:
                raise RuntimeError(f"processes {left} still hold the worker node's mount namespace")
        shutil.rmtree(temp_dir, ignore_errors=True)


RAY_START_TIMEOUT = "timed out during startup"  # `ray start`'s message when its raylet took over 30 s
# a worker node that timed out in start-up is started again, this many times in all: on a loaded
# 2-core host (pytest -n 2 beside a CPU-bound process) three starts in a row timed out
NODE_STARTS = 6


def _check_alive(c: Cluster, deadline: float, what: str) -> None:
    for proc in c._procs:
        if proc.poll() is not None:
            raise RuntimeError(f"`{shlex.join(proc.args[:4])}` exited {proc.returncode}:\n{c.logs()}")
    if time.time() > deadline:
        raise RuntimeError(f"{what} in time:\n{c.logs()}")
