"""Registering the model in MLflow: log it to the parent run, register a version, and move the
alias to it only when it beats the version the alias points at."""

from __future__ import annotations

import warnings
from pathlib import Path

METRIC_TAG = "val_miou"


def register_model(*, uri: str, run_id: str, checkpoint: str | Path, model_name: str, alias: str,
                   miou: float, input_example) -> dict:
    import mlflow
    from mlflow.tracking import MlflowClient

    from .serving import CCNetPyfunc

    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # advice about type hints and cloudpickle: the class is ours
        info = mlflow.pyfunc.log_model(name="model", python_model=CCNetPyfunc(),
                                       artifacts={"checkpoint": str(Path(checkpoint) / "checkpoint.pt")},
                                       input_example=input_example)
    version = mlflow.register_model(info.model_uri, model_name)
    client.set_model_version_tag(model_name, version.version, METRIC_TAG, f"{miou:.6f}")
    current = _alias_version(client, model_name, alias)
    best = current is None or miou > float(current.tags.get(METRIC_TAG, "-inf"))
    if best:
        client.set_registered_model_alias(model_name, alias, version.version)
    return {"name": model_name, "version": int(version.version), "alias": alias, "alias_moved": best,
            "previous": None if current is None else int(current.version), "model_uri": info.model_uri}


def _alias_version(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
