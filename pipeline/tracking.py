"""MLflow: the tracking URI, the pipeline's runs, what they show, metric logging from rank 0.

The URI defaults to an absolute ``sqlite:///<cwd>/mlflow.db`` (absolute because Ray workers run
in other directories), so ``mlflow ui`` started in the same directory shows the runs;
``tracking.tracking_uri`` in the config or ``MLFLOW_TRACKING_URI`` point elsewhere (a server on
a cluster).

The run layout (README, "Runs in MLflow"): one **training run** per training, keyed by the
train step's key and its attempt (``--from train`` starts a new attempt, and a new run): the
config, the datasets, the training curves, system metrics and validation overlays. Under it, one
nested **evaluation run** per evaluation config: the evaluation's metrics and figures, and the
logged model that the registry points at. Changing an evaluation option adds an evaluation
run beside the others, under the training run that holds its curves.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from .config import PipelineConfig, flatten, to_dict

RUN_KEY_TAG = "pipeline.key"
ATTEMPT_TAG = "pipeline.attempt"
STEP_TAG = "pipeline.step"
COMMAND_TAG = "command"


def default_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else an absolute sqlite URI of ./mlflow.db."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def tracking_uri(cfg: PipelineConfig) -> str:
    return cfg.tracking.tracking_uri or default_tracking_uri()


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(c, name: str) -> str:
    """The experiment's id, created if needed. With a sqlite backend its artifacts go beside the
    database (``<db folder>/mlruns/<experiment>``), not under the working directory of whichever
    process created it, which is MLflow's default."""
    exp = c.get_experiment_by_name(name)
    if exp:
        return exp.experiment_id
    uri = c.tracking_uri
    location = None
    if uri.startswith("sqlite:///"):
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "experiment"
        location = str(Path(uri[len("sqlite:///"):]).resolve().parent / "mlruns" / slug)
    return c.create_experiment(name, artifact_location=location)


def find_or_create_run(uri: str, experiment: str, tags: dict[str, str], *, run_name: str,
                       params: dict | None = None) -> str:
    """The id of the run carrying every tag in ``tags`` (set RUNNING again), else a new one with
    those tags, the source tags (git commit, command line) and ``params``."""
    from mlflow.entities import Param

    c = client(uri)
    exp_id = experiment_id(c, experiment)
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    found = c.search_runs([exp_id], filter_string=query, max_results=1)
    if found:
        run_id = found[0].info.run_id
        c.update_run(run_id, status="RUNNING")
        return run_id
    run = c.create_run(exp_id, run_name=run_name, tags={**source_tags(), **tags})
    items = [Param(k, str(v)[:6000]) for k, v in sorted((params or {}).items())]
    for i in range(0, len(items), 100):
        c.log_batch(run.info.run_id, params=items[i:i + 100])
    return run.info.run_id


def parent_run(cfg: PipelineConfig, uri: str, key: str) -> str:
    """A search's parent run (``pipeline.tune``): the one a previous search with the same key
    opened, or a new one with the flattened config as parameters."""
    return find_or_create_run(uri, cfg.tracking.experiment, {RUN_KEY_TAG: key}, run_name=f"{cfg.name}-{key[:8]}",
                              params=flatten(to_dict(cfg)))


def training_run(cfg: PipelineConfig, uri: str, key: str, attempt: int) -> str:
    """The training run of the train step's key and attempt; its parameters are the config but
    the evaluation and tracking sections, which belong to the evaluation runs."""
    params = {k: v for k, v in flatten(to_dict(cfg)).items() if not k.startswith(("eval.", "tracking.", "tune."))}
    name = f"{cfg.name}-train-{key[:8]}" + (f"-{attempt}" if attempt else "")
    return find_or_create_run(uri, cfg.tracking.experiment,
                              {RUN_KEY_TAG: key, ATTEMPT_TAG: str(attempt), STEP_TAG: "train"}, run_name=name,
                              params=params)


def evaluation_run(cfg: PipelineConfig, uri: str, key: str, parent: str) -> str:
    """The evaluation run of the evaluate step's key, nested under its training run."""
    params = {k: v for k, v in flatten(to_dict(cfg)).items() if k.startswith(("eval.", "tracking."))}
    return find_or_create_run(uri, cfg.tracking.experiment,
                              {RUN_KEY_TAG: key, "mlflow.parentRunId": parent, STEP_TAG: "evaluate"},
                              run_name=f"evaluate-{key[:8]}", params=params)


def source_tags() -> dict[str, str]:
    """The command line and, when the code runs from a git checkout, its commit (and whether
    tracked files differ from it)."""
    import subprocess

    command = command_line()
    tags = {COMMAND_TAG: command, "mlflow.source.type": "LOCAL", "mlflow.source.name": " ".join(command.split()[:3])}
    root = str(Path(__file__).resolve().parents[1])
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False)
        if commit.returncode == 0:
            tags["mlflow.source.git.commit"] = commit.stdout.strip()
            dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10, check=False)
            tags["git.dirty"] = str(bool(dirty.stdout.strip())).lower()
    except (OSError, subprocess.SubprocessError):
        pass
    return tags


def command_line() -> str:
    """The command that started this process, as a user would type it (``python -m pipeline.run ...``)."""
    import shlex
    import sys

    argv = list(sys.argv)
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        module = spec.name.removesuffix(".__main__")
        return shlex.join(["python", "-m", module, *argv[1:]])
    return shlex.join(["python", *argv])


def split_digest(manifest: dict, split: str) -> str:
    """A digest of one prepared split: the sha256 of its shards' sha256s, in order."""
    import hashlib

    shards = manifest["splits"][split]["shards"]
    return hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest()[:16]


def log_datasets(uri: str, run_id: str, prepared: str, manifest: dict, splits: dict[str, str]) -> None:
    """The prepared splits as the run's dataset inputs (``mlflow.data``), ``{context: split}``:
    each with its source (the shards' location), the digest of its shards, and a profile of its
    sample count, rejected samples and classes."""
    import json

    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    source = dataset_source(prepared)

    class PreparedSplit(MetaDataset):
        def __init__(self, name, digest, profile):
            self._profile = profile
            super().__init__(source=source, name=name, digest=digest)

        @property
        def profile(self):
            return self._profile

        def to_dict(self):
            return {**super().to_dict(), "profile": json.dumps(self._profile)}

    inputs = []
    name = manifest.get("source", {}).get("name") or manifest.get("source", {}).get("source") or "dataset"
    for context, split in splits.items():
        entry = manifest["splits"][split]
        profile = {"split": split, "num_samples": entry["samples"], "num_rejected": len(entry["rejected"]),
                   "num_shards": len(entry["shards"]), "num_classes": len(manifest["classes"]),
                   "classes": manifest["classes"]}
        ds = PreparedSplit(f"{name}-{split}", split_digest(manifest, split), profile)
        inputs.append(DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)]))
    client(uri).log_inputs(run_id, datasets=inputs)


def dataset_source(location: str):
    """An MLflow dataset source for the shards' location (a local folder or a URI)."""
    from mlflow.data.http_dataset_source import HTTPDatasetSource

    try:
        from mlflow.data.dataset_source_registry import resolve_dataset_source

        return resolve_dataset_source(location)
    except Exception:  # noqa: BLE001 (a scheme MLflow has no source type for: the location, as a URL)
        return HTTPDatasetSource(location)


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

    def log_images(self, images: dict, step: int) -> None:
        """Images by step (``MlflowClient.log_image`` with ``key`` and ``step``), once per step:
        not again for a step whose validation metrics are already logged (a resumed run)."""
        if not self.enabled or step <= self._last.get("val_miou", -1):
            return
        for key, image in images.items():
            self._client.log_image(self.run_id, image, key=key, step=step, synchronous=True)
