"""Training with Ray Train: ``TorchTrainer`` running DDP over the Ray Data shards.

One function per concern, as in torchvision's reference script: the trainer is set up by
``fit``; every worker runs ``train_loop_per_worker``, a handful of named steps (build, restore,
step, validate, report). Rank 0 writes checkpoints and logs to MLflow; every rank reports.
"""

from __future__ import annotations

import math
import tempfile
import time

import numpy as np
import torch

from ccnet import CCNetLoss, ConfusionMatrix, convert_sync_batchnorm, whole
from ccnet.inference import autocast

from .checkpoint import load_checkpoint, model_from_config, save_checkpoint, select_attention, unwrap
from .config import PipelineConfig, from_dict, to_dict
from .evaluate import eval_precision
from .tracking import MetricLogger


class DivergenceError(RuntimeError):
    """The loss became NaN or infinite."""


def make_optimizer(cfg: PipelineConfig, model: torch.nn.Module):
    """SGD with the poly schedule by iteration: lr * (1 - it / max_it) ^ power (CCNet sec. 4.1)."""
    t = cfg.train
    optimizer = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: max(0.0, 1 - it / t.iterations) ** t.poly_power)
    return optimizer, scheduler


def build(cfg: PipelineConfig, num_classes: int):
    import ray.train.torch

    model = model_from_config(cfg, num_classes)
    if cfg.train.sync_bn:  # on GPUs (the config says so); with 1 worker it computes what BatchNorm does
        model = convert_sync_batchnorm(model)
    model = ray.train.torch.prepare_model(model)
    optimizer, scheduler = make_optimizer(cfg, model)
    return model, optimizer, scheduler


def restore(model, optimizer, scheduler) -> tuple[int, int]:
    """Loads the latest reported checkpoint, if any; returns the iteration to start from and the
    number of non-finite steps skipped before it. A damaged latest checkpoint (its size or
    sha256 differs from its sidecar's) gives way to the newest intact one that Ray kept, with a
    message; none intact is an error."""
    import ray.train
    import torch.distributed as dist

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, 0
    rank = ray.train.get_context().get_world_rank()
    # rank 0 chooses, every rank loads the same checkpoint (the ranks must start together)
    chosen = [intact_checkpoint(checkpoint.path, checkpoint.filesystem) if rank == 0 else None]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(chosen, src=0)
    directory = chosen[0]
    with ray.train.Checkpoint(directory, filesystem=checkpoint.filesystem).as_directory() as d:
        ckpt = load_checkpoint(d)
    unwrap(model).load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if directory != checkpoint.path and rank == 0:
        print(f"[train] resuming from the intact checkpoint of iteration {ckpt['iteration']} ({directory})", flush=True)
    return ckpt["iteration"], int(ckpt["metrics"].get("skipped_steps", 0))


def intact_checkpoint(latest: str, fs) -> str:
    """``latest`` if it verifies, else the newest intact checkpoint beside it (Ray's run folder
    keeps ``CheckpointConfig.num_to_keep`` of them and the latest); raises DamagedCheckpoint when
    none is intact."""
    import pyarrow.fs as pafs

    from .checkpoint import DamagedCheckpoint, verify

    try:
        verify(latest, fs)
        return latest
    except DamagedCheckpoint as exc:
        damaged = exc
    print(f"[train] {damaged}; looking for an earlier intact checkpoint", flush=True)
    parent = latest.rstrip("/").rsplit("/", 1)[0]
    found = []
    for info in fs.get_file_info(pafs.FileSelector(parent)):
        if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_") \
                and info.path.rstrip("/") != latest.rstrip("/"):
            try:
                found.append((verify(info.path, fs)["iteration"], info.path))
            except DamagedCheckpoint as exc:
                print(f"[train] {exc}", flush=True)
    if not found:
        raise DamagedCheckpoint(f"{damaged}, and no other intact checkpoint is in {parent}: start the training "
                                "afresh (python -m pipeline.run --from train)")
    return max(found)[1]


def batches(shard, batch_size: int, device: torch.device):
    """Endless (image, label) batches from the worker's shard of the training dataset."""
    while True:
        for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=True, device=device,
                                              dtypes={"image": torch.float32, "label": torch.int64}):
            yield batch["image"], batch["label"]


def first_fetched(batches_iter):
    """The same batches, the first one fetched in a thread from now on: the dataset's start-up
    (its tasks' processes, the first shards' decoding) overlaps the set-up that follows (model,
    DDP, restore, tracking). Its error, if any, is raised where the first batch is taken."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1, thread_name_prefix="first-batch")
    first = pool.submit(next, batches_iter)
    pool.shutdown(wait=False)

    def chained():
        yield first.result()
        yield from batches_iter

    return chained()


def train_step(model, criterion, optimizer, scheduler, scaler, images, labels, amp: str,
               poison: bool = False) -> dict[str, torch.Tensor] | None:
    """One SGD step; None, with the model as it was, when the loss is not finite on some rank.

    BatchNorm updates its running statistics during the forward, before the loss can be checked:
    a skipped step puts every buffer back, so a NaN batch never reaches them (nor, through
    DDP's buffer broadcast, another rank's).
    """
    model.train()
    buffers = [b.detach().clone() for b in model.buffers()]
    with autocast(amp, images.device):
        losses = criterion(model(images), labels)
    if poison:
        losses["total"] = losses["total"] * float("nan")
    if not all_finite(losses["total"]):
        with torch.no_grad():
            for b, saved in zip(model.buffers(), buffers):
                b.copy_(saved)
        scheduler.step()  # the schedule follows the iteration count, skipped or not
        return None
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(losses["total"]).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return {k: v.detach() for k, v in losses.items()}


def all_finite(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every rank: all ranks skip or stop together (a rank that
    skipped the backward alone would leave the others waiting in DDP's all-reduce)."""
    import torch.distributed as dist

    ok = torch.isfinite(loss.detach()).float().reshape(1)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


FAULT_NONFINITE = "CCNET_FAULT_NONFINITE_AT"
FAULT_NONFINITE_INPUT = "CCNET_FAULT_NONFINITE_INPUT_AT"


def poisoned_steps(variable: str = FAULT_NONFINITE) -> set[int]:
    """Fault injection: ``CCNET_FAULT_NONFINITE_AT=23,31`` makes rank 0's loss NaN at those
    iterations, ``CCNET_FAULT_NONFINITE_INPUT_AT`` its input images (the reliability tests use
    them; the driver forwards ``CCNET_*`` to the workers)."""
    import os

    value = os.environ.get(variable, "")
    return {int(v) for v in value.split(",") if v.strip()}


@torch.no_grad()
def validate(model, shard, num_classes: int, device: torch.device, amp: str = "none",
             keep: int = 0) -> tuple[dict[str, float], list]:
    """Whole-image mIoU over this worker's part of the validation split, all-reduced; and, on
    rank 0, the ``keep`` images with the lowest keys across the ranks as (RGB image, label,
    prediction), to draw: the same images at every validation, however the parts fell.
    Every rank must pass the same ``keep``."""
    import torch.distributed as dist

    from data_prep.transforms import IMAGENET_MEAN, IMAGENET_STD

    from .evaluate import denormalize

    model.eval()
    cm = ConfusionMatrix(num_classes, device=device)
    kept, images = [], torch.zeros(1, dtype=torch.int64, device=device)
    for batch in shard.iter_batches(batch_size=1, batch_format="numpy"):
        # a column of images of several sizes comes as an array of arrays
        image = torch.from_numpy(np.stack(list(batch["image"]))).to(device, torch.float32)
        label = torch.from_numpy(np.stack(list(batch["label"]))).to(device)
        with autocast(amp, device):
            logits = whole(unwrap(model), image).float()
        pred = logits.argmax(1)
        cm.update(pred, label)
        images += pred.shape[0]
        key = str(batch["key"][0])
        # this rank's lowest keys: the lowest overall are among them
        if keep and (len(kept) < keep or key < kept[-1][0]):
            kept.append((key, denormalize(np.asarray(batch["image"][0]), IMAGENET_MEAN, IMAGENET_STD),
                         np.asarray(batch["label"][0]), pred[0].to(torch.uint8).cpu().numpy()))
            kept = sorted(kept, key=lambda k: k[0])[:keep]
    cm.all_reduce()
    distributed = dist.is_available() and dist.is_initialized()
    if distributed:
        dist.all_reduce(images)
    if keep and distributed:
        parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(kept, parts, dst=0)
        kept = sorted((k for part in parts for k in part), key=lambda k: k[0])[:keep] if parts else []
    metrics = {"val_miou": cm.miou(), "val_pixel_accuracy": cm.pixel_accuracy(), "val_images": int(images.item())}
    return metrics, [k[1:] for k in kept]


def overlays(kept: list, classes: list[str], palette: list, step: int) -> dict:
    """Validation overlays to log at ``step``: {key: RGB array} (image, ground truth, prediction)."""
    from . import figures

    return {f"val_overlay_{i}": figures.to_array(figures.overlay_figure(
        rgb, label, pred, classes, palette, title=f"validation image {i}, iteration {step}"))
        for i, (rgb, label, pred) in enumerate(kept)}


def system_metrics(cfg: PipelineConfig, uri: str | None, run_id: str | None):
    """MLflow's system metrics monitor for the run (CPU, memory, disk, network, and the GPUs
    where NVML sees them), sampled every ``tracking.system_metrics_every`` seconds; None when
    not tracking."""
    if uri is None or run_id is None or not cfg.tracking.system_metrics_every:
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=cfg.tracking.system_metrics_every,
                                   samples_before_logging=1, resume_logging=True, tracking_uri=uri)
    monitor.start()
    return monitor


def report(cfg, classes, palette, model, optimizer, scheduler, iteration: int, metrics: dict, rank: int) -> None:
    """Every rank reports (a barrier); rank 0 attaches the checkpoint."""
    import ray.train

    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0:
            save_checkpoint(d, cfg=cfg, classes=classes, palette=palette, model=model, optimizer=optimizer,
                            scheduler=scheduler, iteration=iteration, metrics=metrics)
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report({**metrics, "iteration": iteration}, checkpoint=checkpoint)


def placement(rank: int) -> int:
    """How many nodes the workers run on (all ranks take part); rank 0 says where they are."""
    import ray
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    nodes = [None] * dist.get_world_size() if dist.is_initialized() else [node]
    if dist.is_initialized():
        dist.all_gather_object(nodes, node)
    if rank == 0:
        print(f"[train] {len(nodes)} workers on {len(set(nodes))} node(s)", flush=True)
    return len(set(nodes))


def on_nonfinite(cfg: PipelineConfig, step: int, skipped: int, last_checkpoint: int) -> None:
    """train.nonfinite=stop: raise; skip: go on (the step was not applied) up to train.max_skipped_steps."""
    t = cfg.train
    kept = (f"the last good checkpoint (iteration {last_checkpoint}) is kept" if last_checkpoint
            else "no checkpoint was written yet")
    if t.nonfinite == "stop":
        raise DivergenceError(f"the loss is not finite at iteration {step}: training diverged and stops; {kept}. "
                              "Lower train.lr, check the data, or set train.nonfinite=skip")
    if skipped > t.max_skipped_steps:
        raise DivergenceError(f"the loss is not finite at iteration {step}: {skipped} steps skipped, more than "
                              f"train.max_skipped_steps={t.max_skipped_steps}: training stops; {kept}")


def quiet_report_lines() -> None:
    """Ray Train's workers log every report ("Reporting training result ...") at INFO, through a
    logger named after its module's file that Ray's console filter does not cover: raised to
    WARNING, so the console shows the pipeline's own lines."""
    import logging

    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(config: dict) -> None:
    import ray.train

    quiet_report_lines()
    cfg = from_dict(config["pipeline"])
    classes, t = config["classes"], cfg.train
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(t.seed + rank)
    device = ray.train.torch.get_device()
    select_attention(cfg, device)
    data = first_fetched(batches(ray.train.get_dataset_shard("train"), t.batch_size, device))
    model, optimizer, scheduler = build(cfg, len(classes))
    start, skipped = restore(model, optimizer, scheduler)
    criterion = CCNetLoss(aux_weight=t.aux_weight, ohem=t.ohem, ohem_thresh=t.ohem_thresh,
                          ohem_min_kept=t.ohem_min_kept)
    scaler = torch.amp.GradScaler(enabled=t.amp == "fp16" and device.type == "cuda")
    logger = MetricLogger(config.get("tracking_uri"), config.get("run_id"), enabled=rank == 0)
    nodes = placement(rank)
    logger.log({"num_workers": ctx.get_world_size(), "num_nodes": nodes}, start)
    if rank == 0 and start:
        print(f"[train] resumed from the checkpoint of iteration {start}", flush=True)
    monitor = system_metrics(cfg, config.get("tracking_uri"), config.get("run_id")) if rank == 0 else None
    try:
        run_iterations(cfg, config, ctx, model, optimizer, scheduler, criterion, scaler, logger, device,
                       data, start, skipped)
    finally:
        if monitor is not None:
            monitor.finish()


def run_iterations(cfg, config, ctx, model, optimizer, scheduler, criterion, scaler, logger, device,
                   data, start: int, skipped: int) -> None:
    """The training iterations from ``start`` over the batches ``data``: steps, logging,
    validation and checkpoints."""
    import ray.train

    t, classes, rank = cfg.train, config["classes"], ctx.get_world_rank()
    last_checkpoint = start
    poison = poisoned_steps() if rank == 0 else set()
    poison_input = poisoned_steps(FAULT_NONFINITE_INPUT) if rank == 0 else set()
    window, waited, tick = [], 0.0, time.perf_counter()
    stepped, step_seconds = 0, 0.0  # the time in train_step since this attempt started
    for it in range(start, t.iterations):
        step = it + 1
        t0 = time.perf_counter()
        images, labels = next(data)
        waited += time.perf_counter() - t0
        if step in poison_input:
            images = torch.full_like(images, float("nan"))
        t1 = time.perf_counter()
        losses = train_step(model, criterion, optimizer, scheduler, scaler, images, labels, t.amp,
                            poison=step in poison)
        stepped, step_seconds = stepped + 1, step_seconds + time.perf_counter() - t1
        if losses is None:  # before any checkpoint could hold diverged weights
            skipped += 1
            on_nonfinite(cfg, step, skipped, last_checkpoint)
            logger.log({"skipped_steps": skipped}, step)
            if rank == 0:
                print(f"[train] iteration {step}: the loss is not finite; the step is skipped ({skipped} so far)",
                      flush=True)
        else:
            window.append(losses)
        if step % t.log_every == 0 or step == t.iterations:
            elapsed = time.perf_counter() - tick
            metrics = {f"loss{'' if k == 'total' else '_' + k}": sum(float(w[k]) for w in window) / len(window)
                       for k in (window[0] if window else ())}
            metrics |= {"lr": scheduler.get_last_lr()[0],
                        "images_per_s_per_worker": len(window) * t.batch_size / elapsed,
                        "data_wait_share": waited / elapsed}
            if device.type == "cuda":
                metrics["gpu_peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            logger.log(metrics, step)
            if rank == 0 and window:
                print(f"[train] iteration {step}/{t.iterations}  loss {metrics['loss']:.4f}  lr {metrics['lr']:.5f}  "
                      f"{metrics['images_per_s_per_worker']:.1f} img/s/worker  "
                      f"ETA {(t.iterations - step) * elapsed / len(window):.0f} s", flush=True)
            window, waited, tick = [], 0.0, time.perf_counter()
        if step % t.val_every == 0 or step == t.iterations:
            val, kept = validate(model, ray.train.get_dataset_shard("val"), len(classes), device,
                                 eval_precision(cfg, device), keep=cfg.eval.overlays if config.get("palette") else 0)
            if kept:  # only with a palette to draw in
                logger.log_images(overlays(kept, classes, config["palette"], step), step)
            costs = {"step_time_s": step_seconds / max(stepped, 1), "peak_memory_gb": peak_memory_gb(device)}
            logger.log(val | costs, step)
            if rank == 0:
                print(f"[train] iteration {step}: val mIoU {val['val_miou']:.4f}", flush=True)
            report(cfg, classes, config.get("palette"), model, optimizer, scheduler, step,
                   {**val, "skipped_steps": skipped, **costs}, rank)
            last_checkpoint = step
            tick = time.perf_counter()


def peak_memory_gb(device: torch.device) -> float:
    """The peak memory of this worker: CUDA's peak allocation on a GPU, the process's peak
    resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def storage_for(cfg: PipelineConfig) -> str:
    """Where Ray Train and Tune keep their runs and checkpoints: ``ray_storage`` on the storage root."""
    from .storage import join, root

    return join(root(cfg), "ray_storage")


SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of the run's checkpoints


def latest_iteration(storage: str, name: str) -> int:
    """The iteration of the checkpoint that a ``fit`` of the Ray Train run ``name`` under
    ``storage`` resumes from, as Ray's own snapshot of the run records it (its latest
    registered checkpoint); 0 when there is none. (A damaged one is replaced by the newest
    intact one when the workers restore, and they say so.)"""
    from . import storage as st

    try:
        snapshot = st.read_json(st.join(storage, name, SNAPSHOT))
        return int(snapshot["latest_checkpoint_result"]["metrics"]["iteration"])
    except (TypeError, KeyError, ValueError):  # none yet, no checkpoint in it, or half written
        return 0


def check_attention_op(cfg: PipelineConfig) -> None:
    """Before any worker starts: the kernels of model.attention_impl build and load where a training
    worker runs (a task with a worker's resources), else the compiler's error and the fix. Each
    worker checks again on its own node (``select_attention``)."""
    import ray

    s = cfg.scaling
    resources = {"num_cpus": s.cpus_per_worker, "num_gpus": s.gpus_per_worker if s.use_gpu else 0}
    # "DEFAULT": outside any placement group; a Tune trial would otherwise capture the task in its own
    # small bundle, where a worker's resources do not fit
    task = ray.remote(max_retries=0)(select_attention).options(**resources, scheduling_strategy="DEFAULT")
    info = ray.get(task.remote(cfg, "cuda" if s.use_gpu else "cpu"))
    if info is not None:
        print(f"[train] criss-cross attention: the compiled {'/'.join(info.devices)} kernels ({info.library})",
              flush=True)


def epochs_needed(cfg: PipelineConfig, train_samples: int) -> int:
    per_epoch = max(1, train_samples // (cfg.train.batch_size * cfg.scaling.num_workers))
    return math.ceil(cfg.train.iterations / per_epoch) + 1


def data_config():
    """Ray Train's data config, except that the validation split goes to the workers in parts
    that hold every row once: Ray Train's equal parts would drop the rows that do not divide by
    the number of workers (the parts are balanced by blocks, not rows)."""
    import ray.train

    class WholeValidation(ray.train.DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            rest = {k: v for k, v in datasets.items() if k != "val"}
            output = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
            if "val" in datasets:
                val = datasets["val"]
                if val.name is None:
                    val.set_name("val")
                val = val.copy(val)
                val.context.execution_options = ray.train.DataConfig.default_ingest_options()
                for i, part in enumerate(val.streaming_split(world_size, equal=False)):
                    output[i]["val"] = part
            return output

    return WholeValidation()


def fit(cfg: PipelineConfig, prepared: str, manifest: dict, *, storage: str, name: str,
        tracking_uri: str | None, run_id: str | None, callbacks: list | None = None):
    """Runs (or resumes: same name and storage) the training; returns the Ray Train Result."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from data_prep.loader import AugmentConfig, eval_dataset, training_dataset

    from .storage import check_reachable

    check_reachable(storage)
    check_attention_op(cfg)
    t = cfg.train
    augment = AugmentConfig(crop=t.crop, scale=(t.scale_min, t.scale_max), flip=t.flip, jitter=t.jitter)
    n_train = manifest["splits"][cfg.data.train_split]["samples"]
    train_ds = training_dataset(prepared, cfg.data.train_split, augment=augment, seed=t.seed, epoch=0,
                                epochs=epochs_needed(cfg, n_train)).select_columns(["image", "label"])
    val_ds = eval_dataset(prepared, cfg.data.val_split)  # the keys choose the images drawn
    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker} | ({"GPU": s.gpus_per_worker} if s.use_gpu else {})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"pipeline": to_dict(cfg), "classes": manifest["classes"], "palette": manifest["palette"],
                           "tracking_uri": tracking_uri, "run_id": run_id},
        scaling_config=ray.train.ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                               resources_per_worker=resources,
                                               placement_strategy=s.placement_strategy),
        datasets={"train": train_ds, "val": val_ds}, dataset_config=data_config(),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="val_miou",
                                                         checkpoint_score_order="max"),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            callbacks=callbacks or []),
    )
    return trainer.fit()


def best_and_latest(result):
    """(best checkpoint by val mIoU, latest checkpoint, best metrics): ``ray.train.Checkpoint``s,
    on whatever storage the run used."""
    from .checkpoint import DamagedCheckpoint, verify

    # by score, the first that verifies: one checkpoint read in the usual case
    for checkpoint, metrics in sorted(result.best_checkpoints, key=lambda cm: -cm[1].get("val_miou", -1.0)):
        try:
            verify(checkpoint.path, checkpoint.filesystem)
            return checkpoint, result.checkpoint, dict(metrics)
        except DamagedCheckpoint as exc:  # kept by Ray with its score, but not a model to ship
            print(f"[train] {exc}: not a candidate for the final checkpoint", flush=True)
    raise DamagedCheckpoint(f"none of the run's checkpoints is intact ({len(result.best_checkpoints)} kept)")
