"""The training step on one device, without Ray or MLflow: images/s, peak memory and MFU of the
config's model, loss and optimizer on random batches, compiled op against the reference,
interleaved.

    python -m pipeline.step_bench                                   # the default config, CPU
    python -m pipeline.step_bench --device cuda model.backbone=resnet101 train.amp=bf16 \\
        train.batch_size=8 train.crop=769 --steps 20

What ``pipeline.bench`` measures through a whole pipeline run, reduced to the step itself
(``pipeline.train.train_step``: forward under autocast, loss, backward, SGD), so that a GPU
machine with only PyTorch installed can measure it. The data are random images and labels of
the training crop; the timing excludes data loading. Each round times ``--steps`` steps of one
implementation and then of the other (after ``--warmup`` untimed steps each); the table gives
the median over ``--rounds`` rounds. Both models start from the same weights and stay on the
device together, so each peak-memory figure includes the other model's weights and optimizer
state: the two figures compare, their absolute values are high by that much.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

import ops
from ccnet import CCNetLoss

from .bench import flops_per_image, peak_tflops
from .checkpoint import model_from_config, select_attention
from .config import load_config
from .train import make_optimizer, train_step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.step_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, as for pipeline.run")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--classes", type=int, default=19)
    p.add_argument("--steps", type=int, default=10, help="timed steps per round and implementation")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, help="the device's peak for the training dtype (MFU)")
    p.add_argument("--out", help="also write the table to this file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cfg = load_config("default", args.overrides)
    t = cfg.train
    torch.manual_seed(0)
    base = model_from_config(cfg, args.classes, pretrained=False)
    impls = ["compiled", "reference"] if cfg.model.attention == "cca" and cfg.model.recurrence > 0 else ["compiled"]
    runs = {}
    for impl in impls:
        cfg.model.attention_impl = impl
        select_attention(cfg, device)  # compiled: the kernels for this device, or BuildError
        model = copy.deepcopy(base).to(device).train()
        optimizer, scheduler = make_optimizer(cfg, model)
        scaler = torch.amp.GradScaler(enabled=t.amp == "fp16" and device.type == "cuda")
        runs[impl] = (model, optimizer, scheduler, scaler)
    criterion = CCNetLoss(aux_weight=t.aux_weight, ohem=t.ohem, ohem_thresh=t.ohem_thresh,
                          ohem_min_kept=t.ohem_min_kept)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(t.batch_size, 3, t.crop, t.crop, generator=gen).to(device)
    labels = torch.randint(0, args.classes, (t.batch_size, t.crop, t.crop), generator=gen).to(device)

    def steps(impl: str, n: int) -> float:
        ops.set_implementation(impl)
        model, optimizer, scheduler, scaler = runs[impl]
        _sync(device)
        start = time.perf_counter()
        for _ in range(n):
            if train_step(model, criterion, optimizer, scheduler, scaler, images, labels, t.amp) is None:
                raise RuntimeError(f"{impl}: the loss is not finite")
        _sync(device)
        return time.perf_counter() - start

    rates: dict[str, list[float]] = {impl: [] for impl in impls}
    memory: dict[str, float | None] = {}
    try:
        for impl in impls:
            steps(impl, args.warmup)
        for _ in range(args.rounds):
            for impl in impls:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                rates[impl].append(args.steps * t.batch_size / steps(impl, args.steps))
                if device.type == "cuda":
                    memory[impl] = max(memory.get(impl) or 0.0, torch.cuda.max_memory_allocated(device) / 2**30)
    finally:
        ops.set_implementation("compiled")
    flops = flops_per_image(cfg, args.classes)
    peak = args.peak_tflops or (peak_tflops(t.amp) if device.type == "cuda" else None)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines = [(f"training step: {cfg.model.backbone}, R={cfg.model.recurrence}, crop {t.crop}, batch {t.batch_size}, "
              f"amp {t.amp}, {args.classes} classes, ohem {t.ohem}; {args.rounds} rounds x {args.steps} steps "
              f"(after {args.warmup} warm-up steps)"),
             (f"device: {name}; torch {torch.__version__}; model FLOPs per training image (fwd + bwd): "
              f"{flops / 1e9:.1f} GFLOP; peak: {f'{peak:.1f} TFLOPS' if peak else 'unknown'}"), "",
             "| attention | images/s (median) | peak memory | MFU |", "|---|---|---|---|"]
    for impl in impls:
        rate = statistics.median(rates[impl])
        mem = f"{memory[impl]:.2f} GiB" if memory.get(impl) is not None else "n/a"
        mfu = f"{100 * flops * rate / (peak * 1e12):.1f}%" if peak else "n/a"
        lines.append(f"| {impl} | {rate:.2f} | {mem} | {mfu} |")
    if len(impls) == 2:
        lines.append(f"\ncompiled / reference throughput: "
                     f"{statistics.median(rates['compiled']) / statistics.median(rates['reference']):.2f}x")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
