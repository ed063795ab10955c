"""MLflow: the tracking URI, the pipeline's parent run, metric logging from rank 0.

The URI defaults to an absolute ``sqlite:///<cwd>/mlflow.db`` (absolute because Ray workers run
in other directories), so ``mlflow ui`` started in the same directory shows the runs;
``tracking.tracking_uri`` in the config or ``MLFLOW_TRACKING_URI`` point elsewhere (a server on
a cluster).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from .config import PipelineConfig, flatten, to_dict

RUN_KEY_TAG = "pipeline.key"


def default_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else an absolute sqlite URI of ./mlflow.db."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def tracking_uri(cfg: PipelineConfig) -> str:
    return cfg.tracking.tracking_uri or default_tracking_uri()


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def parent_run(cfg: PipelineConfig, uri: str, key: str) -> str:
    """The id of the pipeline's parent run: the one a previous run with the same key opened, or
    a new one with the flattened config as parameters."""
    c = client(uri)
    exp = c.get_experiment_by_name(cfg.tracking.experiment)
    exp_id = exp.experiment_id if exp else c.create_experiment(cfg.tracking.experiment)
    found = c.search_runs([exp_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        c.update_run(run_id, status="RUNNING")
        return run_id
    run = c.create_run(exp_id, run_name=f"{cfg.name}-{key[:8]}", tags={RUN_KEY_TAG: key})
    params = flatten(to_dict(cfg))
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):
        c.log_batch(run.info.run_id, params=items[i:i + 100])
    return run.info.run_id


class MetricLogger:
    """Metrics of the parent run, logged as they come, each (key, step) at most once.

    A run that restarts from its latest checkpoint (a lost worker, a killed driver) goes over
    the steps after that checkpoint a second time; the logger skips every step at or below the
    last one already logged for the key, so the curves continue with no gap and no duplicate.
    A no-op on ranks other than 0.
    """

    def __init__(self, uri: str | None, run_id: str | None, enabled: bool) -> None:
        self.enabled = enabled and uri is not None and run_id is not None
        self.run_id = run_id
        self._client = client(uri) if self.enabled else None
        self._last: dict[str, int] = {}
        if self.enabled:
            for key in self._client.get_run(run_id).data.metrics:
                self._last[key] = max(m.step for m in self._client.get_metric_history(run_id, key))

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        fresh = [Metric(k, float(v), ts, step) for k, v in metrics.items() if step > self._last.get(k, -1)]
        if fresh:
            self._client.log_batch(self.run_id, metrics=fresh)
            self._last.update({m.key: step for m in fresh})
