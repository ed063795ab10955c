"""Training throughput benchmark: images/s, the data-wait share, peak GPU memory and model FLOPs
utilisation (MFU), from a short run of the pipeline.

    python -m pipeline.bench                              # the default config, 400 iterations
    python -m pipeline.bench train.iterations=1000 scaling.num_workers=4
    python -m pipeline.bench --compare-reference model.backbone=resnet18 scaling.use_gpu=true \\
        scaling.num_workers=1 train.amp=bf16 train.iterations=100 --out training.md

Runs prepare and train, the steps it measures, in a temporary directory (real Ray, MLflow on a
temporary sqlite file; nothing reaches the user's tracking server, and nothing is registered) and reads back
what the workers logged every ``train.log_every`` iterations: images/s per worker, the data-wait
share (time blocked in the data iterator over the window's wall time) and, on CUDA, the peak GPU
memory. The first window (warm-up: process groups, the first shards, autotuning) is left out.

MFU = model FLOPs per training image (forward + backward, counted by
``torch.utils.flop_counter`` on one batch at the training crop) x images/s per worker, over the
peak of one worker's device for the training dtype (``--peak-tflops``, else a table of known GPUs;
one GPU per worker). With
``--compare-reference`` the same run follows with ``model.attention_impl=reference``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from .config import PipelineConfig, load_config

# Dense tensor-core peaks in TFLOPS (vendor data sheets): (name fragment, {dtype: peak}).
PEAK_TFLOPS = [
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "none": 378.0}),  # float32 runs as TF32 here
    ("H100 NVL", {"bf16": 835.5, "fp16": 835.5, "none": 417.8}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "none": 494.7}),
    ("H200", {"bf16": 989.4, "fp16": 989.4, "none": 494.7}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "none": 156.0}),
]


def peak_tflops(amp: str) -> float | None:
    """The visible GPU's dense peak for the training dtype, if it is in the table."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peaks[amp] for fragment, peaks in PEAK_TFLOPS if fragment in name), None)


def flops_per_image(cfg: PipelineConfig, num_classes: int) -> float:
    """Forward + backward FLOPs of one training image at the training crop (the model's maths;
    the criss-cross op's FLOPs come from its registered formulas)."""
    from torch.utils.flop_counter import FlopCounterMode

    import ops
    from ccnet import CCNetLoss

    from .checkpoint import model_from_config

    ops.load_compiled()  # registers the op's FLOP formulas
    model = model_from_config(cfg, num_classes, pretrained=False).train()
    n, crop = 2, cfg.train.crop
    images, labels = torch.randn(n, 3, crop, crop), torch.randint(0, num_classes, (n, crop, crop))
    with FlopCounterMode(display=False) as counter:
        CCNetLoss(aux_weight=cfg.train.aux_weight)(model(images), labels)["total"].backward()
    return counter.get_total_flops() / n


def measure(cfg: PipelineConfig) -> dict:
    """One pipeline run of cfg in a temporary directory; the logged training figures."""
    from mlflow.tracking import MlflowClient

    from data_prep.shards import read_manifest

    from .run import run

    prepared = run(cfg, only="prepare")["prepare"]["prepared"]
    results = run(cfg, only="train")  # what is measured; no evaluation, nothing registered
    client = MlflowClient(results["_run"]["uri"])

    def series(key):
        points = sorted(client.get_metric_history(results["_run"]["run_id"], key), key=lambda m: m.step)
        return [m.value for m in points[1:]]  # without the warm-up window

    rate, wait, memory = series("images_per_s_per_worker"), series("data_wait_share"), series("gpu_peak_memory_gb")
    return {"rate": statistics.median(rate), "total": statistics.median(rate) * cfg.scaling.num_workers,
            "wait": statistics.median(wait), "wait_max": max(wait), "memory": max(memory) if memory else None,
            "num_classes": len(read_manifest(prepared)["classes"])}


def table(cfg: PipelineConfig, rows: dict[str, dict], flops: float, peak: float | None) -> str:
    s = cfg.scaling
    lines = [f"training throughput: {cfg.model.backbone}, crop {cfg.train.crop}, batch {cfg.train.batch_size} per "
             f"worker, {s.num_workers} workers x {s.cpus_per_worker} CPU{' + GPU' if s.use_gpu else ''}, "
             f"amp {cfg.train.amp}, {cfg.train.iterations} iterations (first {cfg.train.log_every} left out)",
             f"device: {torch.cuda.get_device_name() if s.use_gpu and torch.cuda.is_available() else 'cpu'}; "
             f"model FLOPs per training image (fwd + bwd): {flops / 1e9:.1f} GFLOP; "
             f"peak: {f'{peak:.1f} TFLOPS' if peak else 'unknown (pass --peak-tflops)'}", "",
             "| attention | images/s per worker (median) | images/s, all workers | data wait (median / max) | "
             "peak GPU memory | MFU |", "|---|---|---|---|---|---|"]
    for impl, r in rows.items():
        memory = f"{r['memory']:.2f} GiB" if r["memory"] is not None else "n/a"
        mfu = f"{100 * flops * r['rate'] / (peak * 1e12):.1f}%" if peak else "n/a"  # per worker's device
        lines.append(f"| {impl} | {r['rate']:.1f} | {r['total']:.1f} | {100 * r['wait']:.1f}% / "
                     f"{100 * r['wait_max']:.1f}% | {memory} | {mfu} |")
    if len(rows) == 2:
        a, b = rows.values()
        lines.append(f"\ncompiled / reference throughput: {a['total'] / b['total']:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, as for pipeline.run")
    p.add_argument("--compare-reference", action="store_true",
                   help="run again with model.attention_impl=reference and compare")
    p.add_argument("--peak-tflops", type=float, help="the device's peak for the training dtype (MFU)")
    p.add_argument("--out", help="also write the table to this file")
    args = p.parse_args(argv)
    rows, cfgs = {}, {}
    for impl in ["compiled", "reference"] if args.compare_reference else ["compiled"]:
        with tempfile.TemporaryDirectory() as tmp:
            overrides = [f"run_dir={tmp}/runs", f"tracking.tracking_uri=sqlite:///{Path(tmp) / 'mlflow.db'}",
                         "train.iterations=400", "train.val_every=400", "train.log_every=50", "eval.overlays=0"]
            cfgs[impl] = load_config("default", overrides + args.overrides + [f"model.attention_impl={impl}"])
            rows[impl] = measure(cfgs[impl])
    cfg = cfgs["compiled"]
    flops = flops_per_image(cfg, rows["compiled"]["num_classes"])
    text = table(cfg, rows, flops, args.peak_tflops or peak_tflops(cfg.train.amp))
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
