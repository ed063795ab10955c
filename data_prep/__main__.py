"""Prepare a dataset into Parquet shards with Ray.

    python -m data_prep --source synthetic --out data/synthetic
    python -m data_prep --source cityscapes --root /data/cityscapes --out s3://bucket/cityscapes
    python -m data_prep --source folder --root my_data --out data/my_data --max-rejected 0.01
"""

from __future__ import annotations

import argparse
import sys

from .prepare import TooManyRejected, prepare
from .sources import SOURCES, SyntheticConfig, build_source


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, choices=SOURCES, help="dataset layout")
    p.add_argument("--root", help="dataset root directory (not needed for synthetic)")
    p.add_argument("--out", required=True, help="output directory: local path or pyarrow URI (s3://...)")
    p.add_argument("--splits", nargs="+", help="splits to prepare (default: all the source has)")
    p.add_argument("--shard-size", type=int, default=64, help="samples per Parquet shard (default 64)")
    p.add_argument("--classes", help="folder source: class list file (default ROOT/classes.yaml|json)")
    p.add_argument("--max-rejected", type=float, default=None,
                   help="fail when more than this fraction of samples is rejected (e.g. 0.01)")
    p.add_argument("--synthetic-train", type=int, default=256, help="synthetic: training samples")
    p.add_argument("--synthetic-val", type=int, default=64, help="synthetic: validation samples")
    p.add_argument("--synthetic-size", type=int, default=96, help="synthetic: image side in pixels")
    p.add_argument("--synthetic-classes", type=int, default=5, help="synthetic: classes incl. background")
    p.add_argument("--seed", type=int, default=0, help="synthetic: generator seed")
    p.add_argument("--address", help="Ray cluster address (default: start Ray locally)")
    p.add_argument("--num-cpus", type=int, help="CPUs for a local Ray (default: all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def make_source(source: str, *, root: str | None = None, classes: str | None = None, synthetic_train: int = 256,
                synthetic_val: int = 64, synthetic_size: int = 96, synthetic_classes: int = 5, seed: int = 0):
    """(source, description recorded in the manifest)."""
    if source == "synthetic":
        cfg = SyntheticConfig(num_classes=synthetic_classes, size=synthetic_size, seed=seed,
                              samples=(("train", synthetic_train), ("val", synthetic_val)))
        return build_source("synthetic", synthetic=cfg), {"name": "synthetic", "config": repr(cfg)}
    return build_source(source, root, classes=classes), {"name": source, "root": str(root), "classes": classes}


def source_from_args(args: argparse.Namespace):
    """The command line's source: ``make_source`` over its options."""
    return make_source(args.source, root=args.root, classes=args.classes, synthetic_train=args.synthetic_train,
                       synthetic_val=args.synthetic_val, synthetic_size=args.synthetic_size,
                       synthetic_classes=args.synthetic_classes, seed=args.seed)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        source, desc = source_from_args(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import ray

    ray.init(address=args.address, num_cpus=args.num_cpus, include_dashboard=False,
             configure_logging=True, logging_level="warning")
    try:
        prepare(source, args.out, source_desc=desc, splits=args.splits, shard_size=args.shard_size,
                max_rejected=args.max_rejected, progress=not args.no_progress)
    except (TooManyRejected, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"manifest: {args.out.rstrip('/')}/manifest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
