"""The GPU path, run before a GPU is seen: the config's GPU rules, the build that workers and
cluster nodes share (architectures, key, lock), no silent fallback when the kernels cannot be
built, a skipped step that leaves the model as it was under DDP, bf16 training on the CPU, and
batched inference on a chosen device. Tests that need CUDA are marked ``gpu``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import ops
from conftest import requires_cuda, tiny_overrides
from ops import extension
from pipeline.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


# --- the config's GPU rules -----------------------------------------------------------------------

def test_config_gpu_rules():
    with pytest.raises(ConfigError, match="train.sync_bn=true needs scaling.use_gpu=true"):
        load_config(None, ["train.sync_bn=true"])
    with pytest.raises(ConfigError, match="train.amp='fp16' needs scaling.use_gpu=true"):
        load_config(None, ["train.amp=fp16"])
    with pytest.raises(ConfigError, match="model.attention_impl"):
        load_config(None, ["model.attention_impl=fast"])
    assert load_config(None, ["train.amp=bf16"]).train.amp == "bf16"  # bf16 runs on the CPU too
    gpu = load_config("cityscapes_r101")
    assert gpu.train.sync_bn and gpu.scaling.use_gpu and gpu.model.attention_impl == "compiled"


# --- one build for every node: architectures, key, lock ---------------------------------------------

def test_arch_list_covers_the_gpus_it_names():
    archs = extension.DEFAULT_CUDA_ARCHS
    assert "+PTX" in archs
    for capability in [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)]:  # A100 ... Blackwell via PTX
        assert extension.arch_covers(archs, capability), capability
    assert not extension.arch_covers(archs, (7, 5))  # T4: needs TORCH_CUDA_ARCH_LIST=7.5
    assert not extension.arch_covers("8.0;9.0", (10, 0))  # no PTX: a newer GPU has nothing to run
    assert extension.arch_covers("7.5", (7, 5)) and not extension.arch_covers("8.6", (8, 0))
    assert extension.arch_covers("9.0a", (9, 0)) and not extension.arch_covers("9.0a", (10, 0))
    assert extension.arch_covers("8.0 10.0f", (10, 0))


def _build_name(env: dict, args: list[str]) -> str:
    out = subprocess.run([sys.executable, "-m", "ops.build", *args, "--dry-run"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return re.search(r"library name: (\S+)", out).group(1)


def test_cluster_build_and_gpu_run_share_one_key(monkeypatch):
    """The ahead-of-time build that cluster.yaml runs on every node, and the build a training worker
    asks for on a GPU node (where the visible GPU's architecture used to change the key): one key."""
    setup = yaml.safe_load((ROOT / "cluster.yaml").read_text())["worker_setup_commands"]
    build = next(c for c in setup if "ops.build" in c).split("&&")[-1].split()
    assignments = dict(a.split("=", 1) for a in build if re.fullmatch(r"[A-Z_]+=.*", a))
    assert build[len(assignments):][1:] == ["-m", "ops.build", "--cuda"], build
    env = {k: v for k, v in os.environ.items() if k != "TORCH_CUDA_ARCH_LIST"}
    aot = _build_name({**env, **{k: v.strip("'\"") for k, v in assignments.items()}}, ["--cuda"])

    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    at_run = f"{extension.LIBRARY}_cuda_{extension.build_key(True)}"
    assert aot == at_run
    assert extension.cuda_arch_list() == extension.DEFAULT_CUDA_ARCHS


def test_workers_on_one_node_build_once(tmp_path):
    """Two processes asking for the kernels at once, with an empty cache: one compiles, under the
    lock; the other waits and loads that library. Both print how long it took."""
    env = {**os.environ, "CCNET_OPS_CACHE": str(tmp_path / "cache"), "CCNET_OPS_CUDA": "0"}
    procs = [subprocess.Popen([sys.executable, "-m", "ops.build", "--cpu-only"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    lines = [re.search(r"ops: \S+ (compiled|loaded from the cache) in ([\d.]+) s(.*)", err).groups()
             for _, err in outputs]
    assert sorted(how for how, _, _ in lines) == ["compiled", "loaded from the cache"], lines
    waiter = next(rest for how, _, rest in lines if how != "compiled")
    assert "waiting for another process's build" in waiter
    assert len(list((tmp_path / "cache").glob("*/*.so"))) == 1


# --- no silent fallback -------------------------------------------------------------------------------

def _broken_toolchain(tmp_path: Path) -> Path:
    """A c++ and an nvcc that answer version queries like real ones (PyTorch asks before it
    builds) and fail every compilation with a message of their own."""
    bin_dir = tmp_path / "toolkit" / "bin"
    bin_dir.mkdir(parents=True)
    (tmp_path / "toolkit" / "include").mkdir()
    (tmp_path / "toolkit" / "include" / "cuda_runtime.h").write_text("")
    versions = {"c++": 'exec /usr/bin/env c++ "$@"',
                "nvcc": f"echo 'Cuda compilation tools, release {torch.version.cuda}, V{torch.version.cuda}.0'; exit 0"}
    for name, version in versions.items():
        tool = bin_dir / name
        tool.write_text(f"#!/bin/sh\ncase \"$1\" in --version|-V|-v|-dumpversion|-dumpfullversion) {version};; esac\n"
                        f"echo '{name}: error: this compiler is broken on purpose' >&2\nexit 1\n")
        tool.chmod(0o755)
    return bin_dir


def _require(device: str, env: dict) -> subprocess.CompletedProcess:
    code = f"import ops; ops.require_compiled({device!r}); print('built')"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_kernels_that_cannot_build_are_an_error_with_the_fix(tmp_path, device):
    """A worker that needs the kernels: the compiler's (nvcc's, for CUDA) own error and the fix, not
    a warning and the reference."""
    bin_dir = _broken_toolchain(tmp_path)
    env = {**os.environ, "CCNET_OPS_CACHE": str(tmp_path / "cache"), "CCNET_OPS_STRICT": "0"}
    if device == "cpu":
        env |= {"CCNET_OPS_CXX": str(bin_dir / "c++"), "CCNET_OPS_CUDA": "0"}
    else:
        env |= {"CUDA_HOME": str(bin_dir.parent), "CCNET_OPS_CUDA": ""}
    result = _require(device, env)
    tool = "c++" if device == "cpu" else "nvcc"
    assert result.returncode != 0 and "built" not in result.stdout
    assert "BuildError" in result.stderr and f"{tool}: error: this compiler is broken on purpose" in result.stderr
    assert "model.attention_impl=reference" in result.stderr and "python -m ops.build --cuda" in result.stderr


def test_gpu_node_without_nvcc_is_an_error(tmp_path):
    """No CUDA toolkit on a GPU node: the CPU kernels build, but a CUDA worker is refused."""
    path = ":".join(p for p in os.environ["PATH"].split(":") if not (Path(p) / "nvcc").exists())
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH", "CCNET_OPS_CUDA")}
    result = _require("cuda", env | {"PATH": path})
    assert result.returncode != 0, result.stdout
    assert "the CUDA kernels were not built on this node: no CUDA toolkit (nvcc) was found" in result.stderr


def test_pipeline_stops_before_training_when_the_kernels_cannot_build(ray_cluster, tmp_path):
    """``python -m pipeline.run`` whose workers get a broken compiler (``CCNET_OPS_CXX``, forwarded to
    them with every ``CCNET_*`` variable) and an empty op cache: the training step stops before any
    worker trains, with the compiler's error and the fix; with model.attention_impl=reference it runs."""
    bin_dir = _broken_toolchain(tmp_path)
    env = {**os.environ, "CCNET_OPS_CXX": str(bin_dir / "c++"), "CCNET_OPS_CUDA": "0",
           "CCNET_OPS_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "pipeline.run", *tiny_overrides(tmp_path), f"ray_address={ray_cluster}",
           "train.iterations=10"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out[-3000:]
    assert "c++: error: this compiler is broken on purpose" in out and "model.attention_impl=reference" in out
    assert "[train] iteration" not in out and not (tmp_path / "runs" / "ray_storage").exists()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs and all(r.info.status == "FAILED" and "loss" not in r.data.metrics for r in runs)

    # the reference, chosen on purpose, reaches every worker: with the same broken compiler, the
    # two training workers and the evaluation run and the pipeline completes
    result = subprocess.run(cmd + ["model.attention_impl=reference"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "[train] 2 workers" in out and "[train] iteration 10/10" in out and "broken on purpose" not in out


# --- a skipped step leaves the model as it was ---------------------------------------------------------

def _skip_nan_input_loop(config: dict) -> None:
    """On each of 2 DDP workers: one good step, then a step whose images are NaN on rank 0 only."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from ccnet import CCNetLoss, build_ccnet
    from pipeline.config import load_config
    from pipeline.train import make_optimizer, train_step

    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(0)
    model = ray.train.torch.prepare_model(build_ccnet(3, backbone="tiny", recurrence=1))
    optimizer, scheduler = make_optimizer(load_config(None, ["train.iterations=10"]), model)
    criterion, scaler = CCNetLoss(), torch.amp.GradScaler(enabled=False)
    gen = torch.Generator().manual_seed(rank)
    images, labels = torch.randn(2, 3, 32, 32, generator=gen), torch.randint(0, 3, (2, 32, 32), generator=gen)
    assert train_step(model, criterion, optimizer, scheduler, scaler, images, labels, "none") is not None
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    if rank == 0:
        images = torch.full_like(images, float("nan"))
    skipped = train_step(model, criterion, optimizer, scheduler, scaler, images, labels, "none") is None
    same_buffers = all(torch.equal(b, buffers[k]) for k, b in model.named_buffers())
    same_params = all(torch.equal(p, params[k]) for k, p in model.named_parameters())
    states = [None, None]
    dist.all_gather_object(states, (skipped, same_buffers, same_params, len(buffers)))
    if rank == 0:  # (Ray Train V2 keeps no metrics without a checkpoint: a file on this machine)
        Path(config["out"]).write_text(json.dumps(states))


def test_skipped_nan_input_step_leaves_every_buffer_unchanged(ray_cluster, tmp_path):
    """NaN images on rank 0 would poison BatchNorm's running statistics during the forward (and
    DDP would broadcast them); a skipped step puts every buffer back, on every rank."""
    import ray.cloudpickle
    import ray.train
    from ray.train.torch import TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import a test module
    out = tmp_path / "states.json"
    trainer = TorchTrainer(
        _skip_nan_input_loop, train_loop_config={"out": str(out)},
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(name="skip_nan_input", storage_path=str(tmp_path)))
    trainer.fit()
    states = json.loads(out.read_text())
    assert len(states) == 2
    for skipped, same_buffers, same_params, n_buffers in states:
        assert skipped and same_buffers and same_params and n_buffers > 0, states


# --- bf16 training on the CPU, through the pipeline ------------------------------------------------------

def test_bf16_pipeline_on_cpu_learns(ray_cluster, tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.run import run

    cfg = load_config(None, tiny_overrides(tmp_path) + [
        "train.amp=bf16", "train.iterations=30", "train.val_every=30", "tracking.model_name=ccnet_bf16"])
    run(cfg, only="prepare")
    results = run(cfg, only="train")  # the training is what is checked
    client = MlflowClient(results["_run"]["uri"])
    history = sorted(client.get_metric_history(results["_run"]["run_id"], "loss"), key=lambda m: m.step)
    loss = [m.value for m in history]
    assert [m.step for m in history] == [5, 10, 15, 20, 25, 30]
    assert all(np.isfinite(loss)) and loss[-1] < 0.8 * loss[0], loss
    assert client.get_run(results["_run"]["run_id"]).data.params["train.amp"] == "bf16"


# --- inference on a chosen device, in batches ------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small trained-looking checkpoint: a tiny CCNet with non-zero attention."""
    from ccnet import build_ccnet
    from pipeline.checkpoint import save_checkpoint

    d = tmp_path_factory.mktemp("ckpt")
    cfg = load_config(None, ["eval.batch_size=3"])
    torch.manual_seed(0)
    model = build_ccnet(5, backbone="tiny", recurrence=2)
    for m in model.modules():
        if hasattr(m, "gamma"):
            torch.nn.init.constant_(m.gamma, 0.7)
    save_checkpoint(d, cfg=cfg, classes=[f"c{i}" for i in range(5)], model=model, iteration=1,
                    palette=[[40 * i, 255 - 40 * i, 7 * i] for i in range(5)])
    return d


def _images(n: int, seed: int = 0, size=(40, 48)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *size, 3), dtype=np.uint8)


def test_batched_prediction_equals_one_at_a_time(checkpoint):
    from pipeline.checkpoint import load_checkpoint, model_from_checkpoint
    from pipeline.evaluate import inference_config, predict_labels

    model, cfg = model_from_checkpoint(load_checkpoint(checkpoint))
    images = _images(5)
    one = predict_labels(model, images, inference_config(cfg), batch_size=1)
    batched = predict_labels(model, images, inference_config(cfg), batch_size=3)
    assert batched.shape == (5, 40, 48) and np.array_equal(one, batched)
    cfg.eval.amp = "bf16"  # CPU autocast: nearly every pixel keeps its class
    low = predict_labels(model, images, inference_config(cfg, "cpu"), batch_size=3)
    assert (low == one).mean() > 0.95


def test_predict_command_device_batches_and_precision(checkpoint, tmp_path, capsys):
    import cv2

    from pipeline.predict import main

    src = tmp_path / "in"
    src.mkdir()
    for i, image in enumerate(_images(3, seed=1)):
        cv2.imwrite(str(src / f"a{i}.png"), image)
    cv2.imwrite(str(src / "b.png"), _images(1, seed=2, size=(32, 64))[0])  # another size: its own batch
    (src / "broken.png").write_bytes(b"not an image")
    args = ["--model", str(checkpoint), "--input", str(src), "--device", "cpu", "--batch-size", "2"]
    assert main(args + ["--out", str(tmp_path / "fp32")]) == 0
    err = capsys.readouterr().err
    assert "predicting on cpu (float32, batches of up to 2)" in err and "skipped" in err and "broken.png" in err
    assert main(args + ["--out", str(tmp_path / "bf16"), "--amp", "bf16"]) == 0
    assert "predicting on cpu (bf16" in capsys.readouterr().err
    for name, shape in [("a0", (40, 48)), ("a2", (40, 48)), ("b", (32, 64))]:
        fp32 = cv2.imread(str(tmp_path / "fp32" / f"{name}_label.png"), cv2.IMREAD_UNCHANGED)
        bf16 = cv2.imread(str(tmp_path / "bf16" / f"{name}_label.png"), cv2.IMREAD_UNCHANGED)
        assert fp32.shape == shape and (fp32 == bf16).mean() > 0.95
    if not torch.cuda.is_available():
        assert main(args[:-4] + ["--out", str(tmp_path / "x"), "--device", "cuda"]) == 2
        assert "PyTorch sees no CUDA device here" in capsys.readouterr().err


class _Context:
    def __init__(self, checkpoint: Path):
        self.artifacts = {"checkpoint": str(checkpoint / "checkpoint.pt")}


@pytest.mark.parametrize("device", ["cpu", pytest.param("", marks=[pytest.mark.gpu, requires_cuda])])
def test_pyfunc_serves_on_its_device_in_batches(checkpoint, monkeypatch, device):
    """The registered model's pyfunc: CCNET_DEVICE, else CUDA when visible; eval.batch_size per
    forward; the same labels as one image at a time on the CPU."""
    from pipeline.checkpoint import load_checkpoint, model_from_checkpoint
    pytest.importorskip("mlflow", reason="the pyfunc is MLflow's")
    from pipeline.evaluate import inference_config, predict_labels
    from pipeline.serving import CCNetPyfunc

    monkeypatch.setenv("CCNET_DEVICE", device)
    served = CCNetPyfunc()
    served.load_context(_Context(checkpoint))
    assert served.device.type == (device or "cuda") and served.batch_size == 3
    assert next(served.model.parameters()).device.type == served.device.type
    images = _images(5, seed=3)
    model, cfg = model_from_checkpoint(load_checkpoint(checkpoint))
    one = predict_labels(model, images, inference_config(cfg), batch_size=1)
    assert (served.predict(None, images) == one).mean() > (0.999 if device == "cpu" else 0.95)
    if not torch.cuda.is_available():
        monkeypatch.setenv("CCNET_DEVICE", "cuda")
        with pytest.raises(ValueError, match="PyTorch sees no CUDA device"):
            CCNetPyfunc().load_context(_Context(checkpoint))


def test_implementation_override_is_refused_in_training_and_allowed_in_serving(monkeypatch):
    from pipeline.checkpoint import select_attention

    cfg = load_config(None, [])
    monkeypatch.setenv("CCNET_OPS_IMPL", "reference")
    with pytest.raises(ValueError, match="CCNET_OPS_IMPL=reference conflicts with model.attention_impl=compiled"):
        select_attention(cfg, "cpu")
    try:
        assert select_attention(cfg, "cpu", env_override=True) is None and ops.get_implementation() == "reference"
    finally:
        ops.set_implementation("compiled")


@pytest.mark.gpu
@requires_cuda
def test_predict_on_cuda_agrees_with_cpu(checkpoint):
    from pipeline.checkpoint import load_checkpoint, model_from_checkpoint
    from pipeline.evaluate import inference_config, predict_labels

    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32
    model, cfg = model_from_checkpoint(load_checkpoint(checkpoint))
    images = _images(4)
    cpu = predict_labels(model, images, inference_config(cfg, "cpu"), batch_size=4)
    for amp in ("none", "bf16", "fp16"):
        cfg.eval.amp = amp
        gpu = predict_labels(model.cuda(), images, inference_config(cfg, "cuda"), batch_size=3)
        assert (gpu == cpu).mean() > (0.999 if amp == "none" else 0.95), amp
        model.cpu()


# --- SyncBN on GPUs --------------------------------------------------------------------------------

def _sync_bn_rank(rank: int, world: int, port: int, batch: torch.Tensor, out: str) -> None:
    """One DDP rank with SyncBN on GPU ``rank``: a training forward and backward over its share of
    the batch; saves the running statistics and gradients of rank 0."""
    import torch.distributed as dist

    from ccnet import build_ccnet, convert_sync_batchnorm

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.cuda.set_device(rank)
    torch.manual_seed(0)
    model = convert_sync_batchnorm(build_ccnet(3, backbone="tiny", recurrence=1)).cuda()
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank])
    share = batch.chunk(world)[rank].cuda()
    ddp(share)["out"].square().mean().backward()
    if rank == 0:
        torch.save({"buffers": {k: b.cpu() for k, b in model.named_buffers()}}, out)
    dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.gpu
@pytest.mark.parametrize("world", [1, 2])
def test_sync_bn_under_ddp_matches_batchnorm_over_the_whole_batch(world, tmp_path):
    """SyncBN across ``world`` GPUs keeps the running statistics that plain BatchNorm computes on
    the whole batch on one device (1 GPU: SyncBN in a one-rank group)."""
    import torch.multiprocessing as mp

    from ccnet import build_ccnet

    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} CUDA devices, {torch.cuda.device_count()} visible")
    batch = torch.randn(4, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_sync_bn_rank, args=(world, _free_port(), batch, out), nprocs=world, join=True)
    synced = torch.load(out, weights_only=True)["buffers"]
    torch.manual_seed(0)
    plain = build_ccnet(3, backbone="tiny", recurrence=1).cuda()
    plain(batch.cuda())
    for k, b in plain.named_buffers():
        torch.testing.assert_close(synced[k], b.cpu(), atol=1e-4, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.gpu
@pytest.mark.parametrize("workers", [1, 2])
def test_gpu_training_through_the_pipeline(ray_cluster, tmp_path, workers):
    """use_gpu=true, SyncBN, bf16, the compiled CUDA kernels: a short run on 1 GPU and, where there
    are 2, a DDP run over nccl whose BatchNorms are SyncBatchNorm; the loss falls and the peak GPU
    memory is logged."""
    from mlflow.tracking import MlflowClient

    from pipeline.run import run

    if torch.cuda.device_count() < workers:
        pytest.skip(f"needs {workers} CUDA devices, {torch.cuda.device_count()} visible")
    cfg = load_config(None, tiny_overrides(tmp_path) + [
        "scaling.use_gpu=true", f"scaling.num_workers={workers}", "train.sync_bn=true", "train.amp=bf16",
        "train.iterations=30", "train.val_every=30", "tracking.model_name=ccnet_gpu"])
    results = run(cfg)
    client = MlflowClient(results["_run"]["uri"])
    run_id = results["_run"]["run_id"]
    loss = [m.value for m in sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)]
    assert loss[-1] < loss[0] and client.get_metric_history(run_id, "gpu_peak_memory_gb")
    assert client.get_metric_history(run_id, "num_workers")[0].value == workers
