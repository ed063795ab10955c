"""A Ray cluster on one machine whose nodes share no disk, as real nodes do.

- object storage: moto's S3 server on 127.0.0.1 (a bucket ``ccnet``);
- the head: ``ray start --head --num-cpus=0`` (it runs drivers and the job server, no tasks), with
  token authentication on (a fresh token, handed to every node, driver and client by the
  environment) and an MLflow tracking server beside it: a sqlite backend on the head's disk,
  artifacts on the object storage;
- worker nodes: each in its own mount namespace (``unshare --mount``) with a private tmpfs over the
  cluster's folder, which holds the head's files, the run directory, the Ray temp dirs and the
  op's build cache, and over ``/tmp/ray``: what one node writes to disk no other node sees, and
  every node builds the op for itself. The nodes have no GPU, and they compile the C++ kernels
  only (``CCNET_OPS_CUDA=0``): with this machine's nvcc, the CUDA sources would add a minute of
  compiling per node and per restart, for kernels these nodes cannot run. The CUDA build itself
  is covered by CI's ``python -m ops.build --cuda`` and by ``ops/gpu_check.sh`` on a GPU.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BUCKET = "ccnet"
VENV_BIN = str(Path(sys.executable).parent)


def free_ports(n: int, taken: set[int]) -> list[int]:
    """n distinct free ports on 127.0.0.1, none of them in ``taken``, which they join. The sockets
    stay bound until all n are drawn: drawn one at a time, the kernel can hand out a port it just
    handed out (a restarted node once got the same port for its node manager and its dashboard
    agent, and did not start)."""
    sockets: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < n:
            s = socket.socket()
            sockets.append(s)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            if port not in taken:
                ports.append(port)
    finally:
        for s in sockets:
            s.close()
    taken.update(ports)
    return ports


def wait_until(check, what: str, timeout: float = 120, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process ended ({proc.returncode})\n" + (log.read_text()[-3000:] if log else ""))
        try:
            if value := check():
                return value
        except Exception:  # not answering yet
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what}: not ready after {timeout:.0f} s\n" + (log.read_text()[-3000:] if log else ""))


def namespaces_refused() -> str | None:
    """None where this process may make mount namespaces with a tmpfs; else the reason."""
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            f"mount -t tmpfs tmpfs {d} && touch {d}/private"], capture_output=True, text=True)
        if r.returncode != 0:
            return f"mount namespaces are not permitted here: {r.stderr.strip() or r.returncode}"
        if os.path.exists(f"{d}/private"):
            return "a tmpfs mounted in a mount namespace is visible outside it"
    return None


def http_ok(url: str, token: str | None = None) -> bool:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=2) as r:
        return r.status == 200


class LocalCluster:
    def __init__(self) -> None:
        # short: Ray's socket paths under its temp dir must stay below 108 characters
        self.base = Path(tempfile.mkdtemp(prefix="ccn-", dir="/tmp"))
        self.ports: set[int] = set()  # every port handed out to a server or a node, never twice
        self.gcs_port, self.dashboard_port, self.s3_port, self.mlflow_port = free_ports(4, self.ports)
        self.s3 = f"http://127.0.0.1:{self.s3_port}"
        self.gcs = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.tracking_uri = f"http://127.0.0.1:{self.mlflow_port}"
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("RAY_", "MLFLOW_", "AWS_")) and k != "CCNET_OPS_CACHE"}
        self.env |= {
            "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.s3, "MLFLOW_S3_ENDPOINT_URL": self.s3,
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            "CCNET_OPS_CACHE": str(self.base / "ops_cache"),  # private on each worker node
            "CCNET_OPS_CUDA": "0",  # CPU nodes: the C++ kernels only
            "RAY_DEDUP_LOGS": "0",
        }
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs = self.base / "logs"
        self.logs.mkdir()

    # --- processes ---------------------------------------------------------------------------

    def _start(self, name: str, cmd: list[str], env: dict | None = None) -> subprocess.Popen:
        log = self.logs / f"{name}.log"
        proc = subprocess.Popen(cmd, stdout=log.open("a"), stderr=subprocess.STDOUT, env=env or self.env,
                                start_new_session=True, cwd=self.base)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def start(self) -> None:
        s3 = self._start("s3", [f"{VENV_BIN}/moto_server", "-H", "127.0.0.1", "-p", str(self.s3_port)])
        wait_until(lambda: http_ok(f"{self.s3}/moto-api/"), "the S3 server", proc=s3, log=self.log("s3"))
        import boto3

        boto3.client("s3", endpoint_url=self.s3, aws_access_key_id="testing", aws_secret_access_key="testing",
                     region_name="us-east-1").create_bucket(Bucket=BUCKET)
        head = self._start("head", ["ray", "start", "--head", "--block", "--num-cpus=0", "--node-ip-address=127.0.0.1",
                                    f"--port={self.gcs_port}", "--include-dashboard=true",
                                    "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                                    f"--temp-dir={self.base / 'ray'}", *self._node_ports(0), "--disable-usage-stats"])
        wait_until(lambda: http_ok(f"{self.dashboard}/api/version", self.env["RAY_AUTH_TOKEN"]), "the Ray head", proc=head, log=self.log("head"))
        mlflow = self._start("mlflow", ["mlflow", "server", "--backend-store-uri", f"sqlite:///{self.base / 'mlflow.db'}",
                                        "--artifacts-destination", f"s3://{BUCKET}/mlflow-artifacts",
                                        "--host", "127.0.0.1", "--port", str(self.mlflow_port), "--workers", "1"],
                             env=self.env | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # as cluster.yaml
        for i in (1, 2):
            self.start_worker(i)
        wait_until(lambda: http_ok(f"{self.tracking_uri}/health"), "the MLflow server", proc=mlflow,
                   log=self.log("mlflow"))
        self.wait_for_nodes(3)

    def _node_ports(self, i: int) -> list[str]:
        """Ports of their own for each node: they all listen on 127.0.0.1."""
        lo = 20000 + 1000 * i  # below the kernel's ephemeral ports (32768-), which free_ports hands out
        manager, objects, agent, agent_grpc, metrics, runtime_env = free_ports(6, self.ports)
        return [f"--node-manager-port={manager}", f"--object-manager-port={objects}",
                f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
                f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
                f"--min-worker-port={lo}", f"--max-worker-port={lo + 999}"]

    def private(self, command: str) -> list[str]:
        """command, run in a mount namespace of its own where the cluster's folder and /tmp/ray are
        empty tmpfs: another machine's disk."""
        mounts = f"mount -t tmpfs tmpfs {self.base} && mount -t tmpfs tmpfs /tmp/ray && cd {self.base}"
        return ["unshare", "--mount", "--propagation", "private", "--", "bash", "-c", f"{mounts} && exec {command}"]

    def start_worker(self, i: int) -> subprocess.Popen:
        os.makedirs("/tmp/ray", exist_ok=True)
        cmd = " ".join(["ray", "start", "--block", f"--address={self.gcs}", "--num-cpus=2",
                        "--node-ip-address=127.0.0.1", f"--temp-dir={self.base}/ray-worker{i}", *self._node_ports(i),
                        "--disable-usage-stats"])
        return self._start(f"worker{i}", self.private(cmd))

    def alive_nodes(self) -> int:
        out = subprocess.run(["ray", "list", "nodes", f"--address={self.dashboard}", "--filter", "state=ALIVE",
                              "--format", "json"], env=self.env, capture_output=True, text=True, timeout=60)
        import json

        return len(json.loads(out.stdout)) if out.returncode == 0 else -1

    def wait_for_nodes(self, n: int, timeout: float = 180) -> None:
        wait_until(lambda: self.alive_nodes() == n, f"{n} alive Ray nodes", timeout=timeout)

    def kill_worker(self, i: int) -> int:
        """SIGKILL every process of the worker node (its raylet, its workers, ...): every process in
        its mount namespace. Returns how many there were."""
        proc = self.procs[f"worker{i}"]
        namespace = os.readlink(f"/proc/{proc.pid}/ns/mnt")
        if namespace == os.readlink("/proc/self/ns/mnt"):  # unshare has not made its namespace yet
            raise RuntimeError(f"worker{i} is still in this process's mount namespace: nothing killed")
        victims = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if os.readlink(f"/proc/{pid}/ns/mnt") == namespace:
                    victims.append(int(pid))
            except OSError:  # gone, or not ours to read
                continue
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        return len(victims)

    def stop(self) -> None:
        for name in [n for n in self.procs if n.startswith("worker")]:
            if self.procs[name].poll() is None:
                try:
                    self.kill_worker(int(name[len("worker"):]))
                except (OSError, RuntimeError):  # its first process ended, or never unshared: pkill below
                    pass
        self._stop_servers()
        # the head's processes left behind (raylet, gcs, dashboard, workers) are in its session's group
        subprocess.run(["pkill", "-9", "-f", str(self.base)], check=False)
        shutil.rmtree(self.base, ignore_errors=True)

    def _stop_servers(self) -> None:
        servers = [p for p in map(self.procs.get, ("mlflow", "head", "s3")) if p is not None and p.poll() is None]
        for proc in servers:  # all at once: each one's shutdown runs beside the others'
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + 5  # a test server: what it has not written by then is not needed
        for proc in servers:
            try:
                proc.wait(timeout=max(deadline - time.time(), 0.1))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()

    # --- clients -------------------------------------------------------------------------------

    def s3_client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.s3, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def s3_keys(self, prefix: str = "") -> list[str]:
        keys = []
        for page in self.s3_client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
            keys += [o["Key"] for o in page.get("Contents", [])]
        return keys

    def s3_read(self, key: str) -> bytes | None:
        try:
            return self.s3_client().get_object(Bucket=BUCKET, Key=key)["Body"].read()
        except self.s3_client().exceptions.NoSuchKey:
            return None
