"""Faults injected into real runs: a killed worker, a killed driver, a diverging loss, a changed
shard, a malicious checkpoint; and what the project exposes on the network.

The runs are ``python -m pipeline.run`` processes joined to the session's Ray instance, so a test
can kill them (or their workers) the way an operator or a cluster would.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for pkg in ("ops", "ccnet", "data_prep", "pipeline") for p in sorted((ROOT / pkg).rglob("*.py"))]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One run directory and MLflow database for the module: the data is prepared once."""
    return tmp_path_factory.mktemp("reliability")


def command(workdir: Path, gcs: str, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "pipeline.run", *tiny_overrides(workdir), f"ray_address={gcs}", *extra]


STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_run_outlives_its_test():
    """A test that fails while its run goes on kills the run: it would hold the session's CPUs
    and write into the module's directory during the next tests."""
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def start(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    STARTED.append(proc)
    return proc


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> str:
    proc.wait(timeout=timeout)
    return log.read_text()


def config(workdir: Path, overrides: list[str]):
    from pipeline.config import load_config

    return load_config(None, tiny_overrides(workdir) + overrides)


def mlflow_run(workdir: Path, overrides: list[str]):
    """(client, training run id) of the pipeline run with these overrides (its first attempt)."""
    from mlflow.tracking import MlflowClient

    from pipeline.dag import step_keys
    from pipeline.tracking import ATTEMPT_TAG, RUN_KEY_TAG

    cfg = config(workdir, overrides)
    client = MlflowClient(cfg.tracking.tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        return client, None
    found = client.search_runs([exp.experiment_id], f"tags.`{RUN_KEY_TAG}` = '{step_keys(cfg)['train']}' "
                               f"and tags.`{ATTEMPT_TAG}` = '0'")
    return client, (found[0].info.run_id if found else None)


def steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def train_storage(workdir: Path, overrides: list[str]) -> Path:
    """The Ray Train directory (checkpoints, snapshot) of the run with these overrides."""
    from pipeline.dag import step_dir, step_keys
    from pipeline.train import storage_for

    cfg = config(workdir, overrides)
    return Path(storage_for(cfg)) / step_dir(cfg, "train", step_keys(cfg)["train"]).rsplit("/", 1)[-1]


def committed(storage: Path) -> int | None:
    """The iteration of the latest checkpoint Ray Train has committed (the one a restart would
    use): its checkpoint manager's snapshot, written once the controller registers a report."""
    import json

    try:
        snapshot = (storage / "checkpoint_manager_snapshot.json").read_text()
        return json.loads(snapshot)["latest_checkpoint_result"]["metrics"]["iteration"]
    except (FileNotFoundError, ValueError, KeyError, TypeError):  # not yet written, or being written
        return None


def wait_for_training(workdir: Path, overrides: list[str], proc: subprocess.Popen, log: Path, after: int = 0) -> int:
    """Waits until a checkpoint past iteration ``after`` is committed and training has gone on past
    it; returns its iteration."""
    storage = train_storage(workdir, overrides)
    deadline = time.time() + 240
    while time.time() < deadline:
        assert proc.poll() is None, "the run ended before the fault was injected:\n" + log.read_text()[-3000:]
        # MLflow's database is opened only once the run has one: two processes creating its
        # tables at the same time race in MLflow's schema migration
        if (iteration := committed(storage)) and iteration > after:
            client, run_id = mlflow_run(workdir, overrides)
            if run_id and (loss := steps(client, run_id, "loss")) and loss[-1] > iteration:
                return iteration
        time.sleep(0.1)
    raise AssertionError(f"training never committed a checkpoint past iteration {after}:\n" + log.read_text()[-3000:])


def train_worker_pids(log: Path) -> list[int]:
    """The live processes of the run's latest Ray Train worker group, as the run's own log lists
    them when the group starts ("(ip=..., pid=N) world_rank=R")."""
    groups = log.read_text().split("Started training worker group")
    pids = [int(p) for p in re.findall(r"pid=(\d+)\) world_rank=", groups[-1])] if len(groups) > 1 else []
    return [pid for pid in pids if alive(pid)]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::")  # not a zombie, nor a reused pid
    except OSError:
        return False


def assert_steps_once(client, run_id: str, iterations: int, val_every: int) -> None:
    """Every logged step once: no gap, no duplicate."""
    assert steps(client, run_id, "loss") == list(range(5, iterations + 1, 5))
    assert steps(client, run_id, "lr") == list(range(5, iterations + 1, 5))
    assert steps(client, run_id, "val_miou") == list(range(val_every, iterations + 1, val_every))


# --- 1. a training worker killed, then the driver ---------------------------------------------

# 240 iterations, a checkpoint every 40: after the first checkpoint, time to see it and kill a
# worker; after the restarted group's first checkpoint, time to see it and kill the driver
LOSSES = ["train.iterations=240", "train.val_every=40", "train.max_failures=2", "train.seed=11"]


def test_training_survives_a_killed_worker_and_resumes_after_a_killed_driver(ray_cluster, workdir):
    """SIGKILL one of the two DDP workers mid-run: Ray Train restarts the group from the latest
    committed checkpoint (or a newer one). Once the new group has committed a checkpoint of its
    own, SIGKILL ``pipeline.run`` itself, and run it again with the same arguments: prepare is
    skipped, training resumes from that checkpoint instead of starting over, the same MLflow run
    goes on, and every step is logged exactly once."""
    cmd = command(workdir, ray_cluster, LOSSES)
    log = workdir / "losses_1.log"
    proc = start(cmd, log)
    kept_at = wait_for_training(workdir, LOSSES, proc, log)
    pids = train_worker_pids(log)
    assert len(pids) == 2, pids
    os.kill(pids[-1], signal.SIGKILL)

    # the group restarts from a committed checkpoint and trains past a checkpoint of its own
    deadline = time.time() + 120
    while not (found := re.search(r"resumed from the checkpoint of iteration (\d+)", log.read_text())):
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-4000:]
        time.sleep(0.1)
    restarted = int(found.group(1))
    assert restarted >= kept_at and restarted % 40 == 0, (restarted, kept_at)  # no checkpoint lost
    kept_again = wait_for_training(workdir, LOSSES, proc, log, after=restarted)
    workers = train_worker_pids(log)
    assert len(workers) == 2 and pids[-1] not in workers, (workers, pids)
    proc.kill()
    proc.wait()
    deadline = time.time() + 60  # its workers go with it (their owner is gone)
    while any(alive(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.5)
    assert not any(alive(pid) for pid in workers)
    client, run_id = mlflow_run(workdir, LOSSES)
    logged_before = steps(client, run_id, "loss")

    log = workdir / "losses_2.log"
    out = finish(start(cmd, log), log)
    assert "[prepare] complete, skipped" in out and "[train] running" in out, out[-4000:]
    resumed = int(re.search(r"resumed from the checkpoint of iteration (\d+)", out).group(1))
    assert resumed >= kept_again and resumed % 40 == 0, (resumed, kept_again)
    assert "prepare: skipped (complete)" in out
    assert "Reporting training result" not in out  # Ray Train's per-report lines stay off the console
    assert f"train: resumed from the checkpoint of iteration {resumed} to 240 (attempt 0" in out
    client, same_run = mlflow_run(workdir, LOSSES)
    assert same_run == run_id  # the same MLflow run goes on
    assert steps(client, run_id, "num_workers") == [0, restarted, resumed]  # logged when a worker group starts
    assert steps(client, run_id, "loss")[:len(logged_before)] == logged_before
    assert_steps_once(client, run_id, 240, 40)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["command"] == shlex.join(["python", "-m", "pipeline.run", *cmd[3:]])


# --- 2. a loss that is not finite ------------------------------------------------------------

@pytest.fixture(scope="module")
def prepared(ray_cluster, workdir) -> str:
    """The module's data, prepared once (runs that start together must not both prepare it)."""
    from pipeline.run import run

    return run(config(workdir, []), only="prepare")["prepare"]["prepared"]


STOP = ["train.iterations=40", "train.val_every=10", "train.max_failures=0", "train.seed=13"]
SKIP = ["train.iterations=40", "train.val_every=40", "train.nonfinite=skip", "train.seed=14"]


def test_nonfinite_loss_stops_or_is_skipped_as_configured(ray_cluster, workdir, prepared):
    """Two runs at once on the session's Ray, each with NaNs injected.

    - ``train.nonfinite=stop`` (the default), a NaN loss at iteration 23: the run stops naming the
      iteration and keeps the last good checkpoint (20), every kept checkpoint finite.
    - ``train.nonfinite=skip``, NaN losses at 13 and 17 and NaN input images at 21 (which
      BatchNorm sees before the loss): each step is skipped and counted, no NaN reaches the logged
      loss, and the final BatchNorm statistics are finite. Its MLflow database is its own: sqlite
      takes one writer at a time. The training step alone (the data is prepared)."""
    skip = SKIP + [f"tracking.tracking_uri=sqlite:///{workdir / 'skip.db'}"]
    stop_log, skip_log = workdir / "diverge_stop.log", workdir / "diverge_skip.log"
    stop_proc = start(command(workdir, ray_cluster, STOP), stop_log, {"CCNET_FAULT_NONFINITE_AT": "23"})
    skip_proc = start(command(workdir, ray_cluster, skip) + ["--only", "train"], skip_log,
                      {"CCNET_FAULT_NONFINITE_AT": "13,17", "CCNET_FAULT_NONFINITE_INPUT_AT": "21"})
    out, skip_out = finish(stop_proc, stop_log), finish(skip_proc, skip_log)

    from pipeline.checkpoint import load_checkpoint

    assert out and "the loss is not finite at iteration 23" in out, out[-4000:]
    assert "the last good checkpoint (iteration 20) is kept" in out
    client, run_id = mlflow_run(workdir, STOP)
    assert steps(client, run_id, "val_miou") == [10, 20] and steps(client, run_id, "loss")[-1] == 20
    assert client.get_run(run_id).info.status == "FAILED"
    kept = [load_checkpoint(p) for p in train_storage(workdir, STOP).glob("checkpoint_*/checkpoint.pt")]
    assert max(c["iteration"] for c in kept) == 20
    assert all(torch.isfinite(t).all() for c in kept for t in c["model"].values() if t.is_floating_point())

    assert skip_proc.returncode == 0, skip_out[-4000:]
    assert "iteration 13: the loss is not finite; the step is skipped (1 so far)" in skip_out
    client, run_id = mlflow_run(workdir, skip)
    skipped = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "skipped_steps"))
    assert skipped == [(13, 1.0), (17, 2.0), (21, 3.0)]
    assert steps(client, run_id, "loss") == list(range(5, 41, 5))
    assert all(m.value == m.value for m in client.get_metric_history(run_id, "loss"))  # no NaN averaged in
    final = max((load_checkpoint(p) for p in train_storage(workdir, skip).glob("checkpoint_*/checkpoint.pt")),
                key=lambda c: c["iteration"])
    stats = {k: t for k, t in final["model"].items() if "running_" in k}
    assert final["iteration"] == 40 and stats and all(torch.isfinite(t).all() for t in stats.values())


# --- 3. a shard changed after preparation -------------------------------------------------------

def test_changed_shard_is_refused_before_training(ray_cluster, tmp_path):
    from pipeline.run import run

    cfg = config(tmp_path, ["train.iterations=10", "train.val_every=10"])
    prepared = run(cfg, only="prepare")["prepare"]["prepared"]
    shard = sorted(Path(prepared).rglob("*.parquet"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    shard.write_bytes(bytes(data))
    with pytest.raises(Exception, match=re.escape(str(shard)) + ".*does not match the sha256"):
        run(cfg)
    assert not (tmp_path / "runs" / "ray_storage").exists()  # the trainer never started
    client, run_id = mlflow_run(tmp_path, ["train.iterations=10", "train.val_every=10"])
    assert not client.get_metric_history(run_id, "loss")


# --- 4. a checkpoint that would run code -----------------------------------------------------------

def test_checkpoint_sidecar_catches_truncation_and_corruption(tmp_path):
    """``verify`` against the size and sha256 written beside the checkpoint; for_serving drops
    the optimizer and scheduler state."""
    import json

    from pipeline.checkpoint import DamagedCheckpoint, for_serving, load_checkpoint, save_checkpoint, verify
    from pipeline.config import load_config

    cfg = load_config(None)
    model = torch.nn.Conv2d(3, 4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(1, 3, 2, 2)).sum().backward()
    optimizer.step()
    path = save_checkpoint(tmp_path, cfg=cfg, classes=["a", "b"], model=model, optimizer=optimizer, iteration=7)
    meta = verify(str(tmp_path))
    assert meta["iteration"] == 7 and meta["bytes"] == path.stat().st_size
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit, same size
    with pytest.raises(DamagedCheckpoint, match="corrupted"):
        verify(str(tmp_path))
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DamagedCheckpoint, match="truncated"):
        verify(str(tmp_path))
    path.write_bytes(data)
    (tmp_path / "checkpoint.json").unlink()
    with pytest.raises(DamagedCheckpoint, match="missing or unreadable"):
        verify(str(tmp_path))

    (tmp_path / "served").mkdir()
    served = load_checkpoint(for_serving(path, tmp_path / "served"))
    assert served["optimizer"] is None and served["scheduler"] is None
    assert torch.equal(served["model"]["weight"], model.weight.detach())
    assert load_checkpoint(path)["optimizer"]["state"]  # the training checkpoint keeps it
    assert json.loads((tmp_path / "served" / "checkpoint.json").read_text())["iteration"] == 7


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_is_refused(tmp_path):
    from pipeline.checkpoint import load_checkpoint

    marker = tmp_path / "code_ran"
    evil = tmp_path / "checkpoint.pt"
    torch.save({"model": _Payload(marker), "iteration": 1}, evil)
    with pytest.raises(ValueError, match="refusing to load"):
        load_checkpoint(evil)
    assert not marker.exists()
    # the same file through the command line
    proc = subprocess.run([sys.executable, "-m", "pipeline.predict", "--model", str(evil), "--input", str(evil),
                           "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "refusing to load" in proc.stderr
    assert not marker.exists()
    # the control: the same payload, unpickled without the guard, does run its code
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_every_torch_load_is_weights_only():
    calls = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "load" and \
                    getattr(node.func.value, "id", None) == "torch":
                kw = {k.arg: k.value for k in node.keywords}
                calls.append((path.name, node.lineno))
                assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, \
                    f"{path}:{node.lineno} calls torch.load without weights_only=True"
    assert calls  # the scan found the loader


# --- 5. what listens on the network ------------------------------------------------------------

def _external_ip() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent; picks the outward interface
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def test_dashboard_listens_on_loopback_only(ray_cluster):
    """The session's Ray, started by the pipeline's ``init_ray``: its dashboard answers on
    127.0.0.1 and not on the machine's own address."""
    from ray._private.worker import get_dashboard_url

    host, port = get_dashboard_url().rsplit(":", 1)
    assert host == "127.0.0.1"
    with socket.socket() as s:
        s.settimeout(3)
        assert s.connect_ex(("127.0.0.1", int(port))) == 0  # it is up
    ip = _external_ip()
    if ip is not None:
        with socket.socket() as s:
            s.settimeout(3)
            assert s.connect_ex((ip, int(port))) != 0, f"the dashboard answers on {ip}:{port}"


def test_documented_servers_bind_to_loopback():
    """The commands the project documents or prints: every MLflow server or UI for one machine
    binds to 127.0.0.1, every Ray head's dashboard too; on the cluster, MLflow binds to the
    private IP and nothing to 0.0.0.0 (what actually listens: the psutil test below)."""
    texts = {p: p.read_text() for p in [ROOT / "README.md", ROOT / "cluster.yaml", *SOURCES]}
    found = 0
    for path, text in texts.items():
        assert "0.0.0.0" not in text, path
        for line in text.splitlines():
            if re.search(r"mlflow (ui|server)\b", line) and "--host" in line:
                found += 1
                host = re.search(r"--host[ =]([^\s\"']+)", line).group(1)
                private_ip = "$(hostname -I" in line and path.name == "cluster.yaml"
                assert host == "127.0.0.1" or private_ip, f"{path.name}: {line.strip()}"
            if re.search(r"ray start --head", line):
                found += 1
                assert "--dashboard-host=127.0.0.1" in line, f"{path.name}: {line.strip()}"
    assert found >= 3
    for path in SOURCES:  # every ray.init the code makes: no dashboard, or one on 127.0.0.1
        src = path.read_text()
        for m in re.finditer(r"include_dashboard[\"']?[=:] ?(\w+)", src):
            assert m.group(1) == "False" or '"dashboard_host": "127.0.0.1"' in src, path


LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


@pytest.mark.slow
def test_local_run_listens_on_loopback_only(tmp_path):
    """A local ``python -m pipeline.run``, its own Ray started as on a laptop: every socket that
    its processes listen on (the driver, GCS, raylet, object manager, dashboard and its agents,
    the runtime-env agent, every worker), sampled through the run, is on the loopback interface."""
    import psutil

    log = tmp_path / "local.log"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.run", *tiny_overrides(tmp_path), "train.iterations=10",
                             "train.val_every=10", "num_cpus=2"], cwd=ROOT, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, env=env)
    STARTED.append(proc)
    seen: dict[tuple[str, str, int], int] = {}
    titles: dict[int, set[str]] = {}  # every title a process showed: a Ray worker's changes with its task
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            break
        for p in tree:
            try:
                name, sockets = p.name(), p.net_connections(kind="inet")
                if name.startswith("python"):  # the driver, the dashboard: by their script
                    name = "python:" + " ".join(Path(a).name for a in p.cmdline()[1:3])
            except psutil.Error:  # a process that ended between the listing and the look
                continue
            titles.setdefault(p.pid, set()).add(name)
            for c in sockets:
                if c.status == psutil.CONN_LISTEN:
                    seen[(name, c.laddr.ip, c.laddr.port)] = p.pid
        time.sleep(0.3)
    proc.wait()
    assert proc.returncode == 0, log.read_text()[-3000:]
    names = {name for name, _, _ in seen}
    assert {"gcs_server", "raylet"} <= names and any(n.startswith("ray::") for n in names), sorted(seen)
    assert any("dashboard.py" in name for name, _, _ in seen), sorted(seen)
    exposed = sorted(s for s in seen if s[1] not in LOOPBACK)
    # the one exception (README, "Network exposure"): PyTorch's TCPStore, the DDP rendezvous, on
    # rank 0's training worker; PyTorch binds it to every interface. The worker is known by its
    # process, whatever task title it showed when sampled (ray::execute._setup_torch_process_group...)
    train_workers = {pid for pid, names in titles.items() if any(n.startswith("ray::RayTrainWorker") for n in names)}
    assert len({port for _, _, port in exposed}) <= 1 and all(seen[s] in train_workers for s in exposed), \
        f"listening beyond loopback: {exposed}"
    assert len({s for s in seen if s[1] in LOOPBACK}) >= 6  # the rest, on loopback