"""Benchmark: preparation with Ray tasks against a serial loop, and loader throughput.

    python -m data_prep.bench                   # 96 + 12 Cityscapes-sized images (1024 x 2048)
    python -m data_prep.bench --images 24 --height 512 --width 1024

Builds a Cityscapes-layout tree of generated images in a temporary directory, prepares it once
with a plain loop in this process (the same per-shard code, no Ray) and once with Ray tasks, in
the same run, and reports images/s and the ratio. Then it reads the shards back through the
training loader (decode + scale + crop + flip + normalise on Ray Data workers) and the
evaluation loader, and reports decoded images/s.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from .loader import AugmentConfig, eval_dataset, training_dataset
from .prepare import build_rows, make_plan, prepare, shard_name
from .shards import resolve, write_shard
from .sources import build_source


def make_tree(root: Path, n: int, height: int, width: int) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("val", max(1, n // 8))):
        for kind in ("leftImg8bit", "gtFine"):
            (root / kind / split / "city").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            small = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
            image = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)  # photo-like smoothness
            image = cv2.add(image, rng.integers(0, 8, image.shape, dtype=np.uint8))
            ids = cv2.resize(rng.choice([7, 8, 11, 21, 23, 24, 26], (height // 32, width // 32)).astype(np.uint8),
                             (width, height), interpolation=cv2.INTER_NEAREST)
            stem = f"city_000000_{i:06d}"
            cv2.imwrite(str(root / "leftImg8bit" / split / "city" / f"{stem}_leftImg8bit.png"), image)
            cv2.imwrite(str(root / "gtFine" / split / "city" / f"{stem}_gtFine_labelIds.png"), ids)


def warm_up(pause: float = 0.0) -> None:
    """First-use costs (codec and Parquet writer set-up, about 0.5 s a process), paid before timing."""
    from .shards import encode_table
    from .sources.base import encode_png

    png = encode_png(np.zeros((8, 8, 3), np.uint8))
    cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    encode_table([{"key": "k", "image": png, "image_format": "png", "label": png, "height": 8, "width": 8}])
    time.sleep(pause)  # keeps one worker busy, so every worker gets a warm-up task


def serial(source, out: str, shard_size: int) -> int:
    fs, base = resolve(out)
    fs.create_dir(base, recursive=True)
    n = 0
    for split, chunks in make_plan(source, list(source.splits), shard_size).shards.items():
        for i, refs in enumerate(chunks):
            rows, _ = build_rows(source, refs)
            write_shard(fs, base, shard_name(split, i), rows)
            n += len(rows)
    return n


def loader_rate(ds, batch_size: int) -> tuple[int, float]:
    start, n = time.perf_counter(), 0
    for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        n += len(batch["key"])
    return n, n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--shard-size", type=int, default=4)
    p.add_argument("--crop", type=int, default=769)
    p.add_argument("--num-cpus", type=int, default=os.cpu_count())
    p.add_argument("--repeat", type=int, default=3, help="timed runs of each side (medians)")
    args = p.parse_args(argv)
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "cityscapes"
        make_tree(root, args.images, args.height, args.width)
        source = build_source("cityscapes", root)
        total = sum(len(source.list(s)) for s in source.splits)
        warm_up()
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, logging_level="warning")
        # both sides start warm: Ray's worker processes up, with the modules imported and the
        # codecs set up, as this process is for the serial loop
        ray.get([ray.remote(warm_up).remote(0.5) for _ in range(args.num_cpus)])
        t_serial, t_ray = [], []
        for r in range(args.repeat):  # interleaved, medians reported
            t0 = time.perf_counter()
            serial(source, f"{tmp}/serial{r}", args.shard_size)
            t_serial.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            prepare(source, f"{tmp}/ray{r}", source_desc={"name": "bench"}, shard_size=args.shard_size,
                    progress=False, summary=False)
            t_ray.append(time.perf_counter() - t0)
        t_serial, t_ray = statistics.median(t_serial), statistics.median(t_ray)
        aug = AugmentConfig(crop=args.crop, scale=(0.7, 2.1), jitter=True)
        train_n, train_rate = loader_rate(training_dataset(f"{tmp}/ray0", "train", augment=aug, seed=0, epoch=0), 4)
        eval_n, eval_rate = loader_rate(eval_dataset(f"{tmp}/ray0", "val"), 1)
    print(f"\ndata_prep benchmark: {total} images of {args.height} x {args.width}, "
          f"{args.num_cpus} CPUs ({platform.machine()}), shard size {args.shard_size}, "
          f"median of {args.repeat} interleaved runs")
    print("| step | images | serial s | Ray s | serial img/s | Ray img/s | ratio |")
    print("|---|---|---|---|---|---|---|")
    print(f"| prepare | {total} | {t_serial:.1f} | {t_ray:.1f} | {total / t_serial:.1f} | {total / t_ray:.1f} | "
          f"{t_serial / t_ray:.2f}x |")
    print("\n| loader | images | img/s |\n|---|---|---|")
    print(f"| training (decode, scale 0.7-2.1, crop {args.crop}, flip, jitter, normalise) | {train_n} | {train_rate:.1f} |")
    print(f"| evaluation (decode, normalise) | {eval_n} | {eval_rate:.1f} |")


if __name__ == "__main__":
    main()
