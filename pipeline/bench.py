"""Training throughput benchmark: images/s per worker and the share of step time spent waiting
for data, from a short run of the pipeline.

    python -m pipeline.bench                              # the default config, 400 iterations
    python -m pipeline.bench train.iterations=1000 scaling.num_workers=4

Runs prepare -> train -> evaluate -> register in a temporary directory (real Ray, MLflow on a
temporary sqlite file) and reads back what the workers logged every ``train.log_every``
iterations: images/s per worker and the data-wait share (time blocked in the data iterator over
the window's wall time). The first window (warm-up: process groups, the first shards) is left out.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

from .config import load_config


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"run_dir={tmp}/runs", f"tracking.tracking_uri=sqlite:///{Path(tmp) / 'mlflow.db'}",
                     "train.iterations=400", "train.val_every=400", "train.log_every=50", "eval.overlays=0"]
        cfg = load_config("default", overrides + argv)
        from mlflow.tracking import MlflowClient

        from .run import run

        results = run(cfg)
        client = MlflowClient(results["_run"]["uri"])

        def series(key):
            points = sorted(client.get_metric_history(results["_run"]["run_id"], key), key=lambda m: m.step)
            return [m.value for m in points[1:]]  # without the warm-up window

        rate, wait = series("images_per_s_per_worker"), series("data_wait_share")
    s = cfg.scaling
    print(f"\ntraining throughput: {cfg.model.backbone}, crop {cfg.train.crop}, batch {cfg.train.batch_size} per "
          f"worker, {s.num_workers} workers x {s.cpus_per_worker} CPU{' + GPU' if s.use_gpu else ''}, "
          f"{cfg.train.iterations} iterations (first {cfg.train.log_every} left out)")
    print("| images/s per worker (median) | images/s, all workers | data wait share (median) | data wait share (max) |")
    print("|---|---|---|---|")
    print(f"| {statistics.median(rate):.1f} | {statistics.median(rate) * s.num_workers:.1f} | "
          f"{100 * statistics.median(wait):.1f}% | {100 * max(wait):.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
