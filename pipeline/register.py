"""Registering the model in MLflow: log it to the evaluation run, register a version, and move
the alias to it only when it beats the version the alias points at, as measured by the same
evaluation.

Lineage: a registered model holds one task, the dataset and its class list
(``ccnet-cityscapes``, ``ccnet-synthetic-5``; ``model_name_for``), unless ``tracking.model_name``
says otherwise. Each version carries its validation mIoU and the *protocol* it was measured
with (``pipeline.evaluate.protocol``: the evaluation config and the digest of the validation
shards). Scores measured under different protocols are not compared: the alias then stays,
and the result says why.
"""

from __future__ import annotations

import re
import tempfile
import warnings
from pathlib import Path

METRIC_TAG = "val_miou"
PROTOCOL_TAG = "eval_protocol"
CLASSES_TAG = "classes"

# the class lists of the datasets the project reads, by their number of classes
STANDARD_CLASSES = {"cityscapes": 19, "ade20k": 150, "voc": 21}


def model_name_for(data, manifest: dict) -> str:
    """The registered model's name for a task: ``ccnet-<dataset>`` for a standard dataset with
    its standard classes, else ``ccnet-<dataset>-<number of classes>`` (for a folder dataset, the
    folder's name)."""
    n = len(manifest["classes"])
    if data.source in STANDARD_CLASSES and STANDARD_CLASSES[data.source] == n:
        return f"ccnet-{data.source}"
    name = data.source
    if data.source == "folder" and data.root:
        name = data.root.split("?")[0].rstrip("/").rsplit("/", 1)[-1] or "folder"
    return f"ccnet-{re.sub(r'[^A-Za-z0-9_.-]+', '-', name).strip('-').lower()}-{n}"


def signature():
    """Any number of RGB uint8 images of any size in, label maps of the same size out."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
                          outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1))]))


# what loading and serving the model imports, besides this project's own packages
SERVING_PACKAGES = ("torch", "numpy", "mlflow", "cloudpickle")


def serving_requirements() -> list[str]:
    """The model's pip requirements: SERVING_PACKAGES at the versions that logged it (the public
    version: ``2.14.1``, not ``2.14.1+cu130``, so a CPU or another CUDA build of the same release
    serves it). Listed rather than inferred: MLflow's inference loads the model in a subprocess,
    seconds per registration, found pieces of CUDA wheels but not torch itself, and pinned this
    project by its distribution name, which on PyPI is another project's: the serving environment
    installs this one from its repository (README, "The registry")."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in SERVING_PACKAGES]


def register_model(*, uri: str, run_id: str, checkpoint: str | Path, model_name: str, alias: str,
                   miou: float, protocol: str, classes: list[str], input_size: int = 64) -> dict:
    """Logs the pyfunc (its checkpoint without optimizer state) to ``run_id``, registers a
    version of ``model_name`` in the registry at ``uri`` (never the process's default), and
    moves ``alias`` to it when it scores higher under the same protocol."""
    import json

    import mlflow
    import numpy as np
    from mlflow.tracking import MlflowClient

    from .checkpoint import for_serving
    from .serving import CCNetPyfunc

    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    example = np.zeros((1, input_size, input_size, 3), np.uint8)
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cloudpickle's advice: the class is ours
        served = for_serving(checkpoint, tmp)
        info = mlflow.pyfunc.log_model(name="model", python_model=CCNetPyfunc(), artifacts={"checkpoint": str(served)},
                                       signature=signature(), input_example=example,
                                       pip_requirements=serving_requirements())
    ensure_registered(client, model_name, f"CCNet for {len(classes)} classes: {', '.join(classes[:30])}")
    version = client.create_model_version(model_name, info.model_uri, run_id=run_id, model_id=info.model_id,
                                          tags={METRIC_TAG: f"{miou:.6f}", PROTOCOL_TAG: protocol,
                                                CLASSES_TAG: json.dumps(classes)[:5000]})
    current = _alias_version(client, model_name, alias)
    moved, note = decide(current, miou, protocol, alias)
    if moved:
        client.set_registered_model_alias(model_name, alias, version.version)
    return {"name": model_name, "version": int(version.version), "alias": alias, "alias_moved": moved,
            "previous": None if current is None else int(current.version), "alias_note": note,
            "model_uri": info.model_uri}


def ensure_registered(client, name: str, description: str) -> None:
    """Creates the registered model unless it exists (another run may create it meanwhile)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode

    try:
        client.get_registered_model(name)
        return
    except MlflowException as exc:
        if exc.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise
    try:
        client.create_registered_model(name, description=description)
    except MlflowException as exc:
        if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise


def decide(current, miou: float, protocol: str, alias: str) -> tuple[bool, str]:
    """(whether the alias moves to the new version, why): it moves when it points nowhere, or at
    a version measured under the same protocol with a lower mIoU."""
    if current is None:
        return True, f"alias @{alias} now points here: the first version under it"
    theirs = current.tags.get(PROTOCOL_TAG)
    score = float(current.tags.get(METRIC_TAG, "-inf"))
    if theirs != protocol:
        return False, (f"alias @{alias} kept on version {current.version}: it was evaluated under another "
                       f"protocol ({theirs} here {protocol}: a different evaluation config or validation data), "
                       "so the scores are not compared; set the alias by hand if this version should take it")
    if miou > score:
        return True, f"alias @{alias} moved here from version {current.version} (mIoU {score:.4f} -> {miou:.4f})"
    return False, (f"alias @{alias} kept on version {current.version}, which scores higher or equal "
                   f"(mIoU {score:.4f}; this version {miou:.4f})")


def _alias_version(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
