"""Self-describing checkpoints: everything needed to rebuild, resume or serve the model.

A checkpoint is one ``checkpoint.pt`` holding plain data only (the pipeline config as a dict, the
class names, the model, optimizer and scheduler state dicts, the iteration and the metrics), so
it loads with ``torch.load(..., weights_only=True)``: a file that would run code when unpickled
is refused. Beside it, ``checkpoint.json`` records its size and sha256 and the iteration: a
truncated or corrupted file is recognised before it is loaded (``verify``), and training resumes
from the newest intact checkpoint instead.

The training checkpoint also holds the optimizer and scheduler state, to resume; the model that
MLflow logs and serves holds the weights, the config and the classes only (``for_serving``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import ops
from ccnet import build_ccnet

from .config import PipelineConfig, from_dict, to_dict

FILENAME = "checkpoint.pt"
SIDECAR = "checkpoint.json"


class DamagedCheckpoint(ValueError):
    """A checkpoint whose file does not match its recorded size and sha256 (truncated, corrupted)."""


FUSED = {"auto": None, "always": True, "never": False}  # model.fused_attention -> the op's ``fused``


def model_from_config(cfg: PipelineConfig, num_classes: int, *, pretrained: bool = True) -> nn.Module:
    m = cfg.model
    return build_ccnet(num_classes, backbone=m.backbone, recurrence=m.recurrence, share_weights=m.share_weights,
                       attention=m.attention, aux=m.aux, head_channels=m.head_channels, gamma_init=m.gamma_init,
                       fused_attention=FUSED[m.fused_attention] if m.attention == "cca" else None,
                       pretrained=m.pretrained if pretrained else None)


def uses_attention_op(cfg: PipelineConfig) -> bool:
    """Whether the model calls the criss-cross attention op at all."""
    return cfg.model.attention == "cca" and cfg.model.recurrence > 0


def select_attention(cfg: PipelineConfig, device: torch.device | str, *,
                     env_override: bool = False) -> ops.extension.BuildInfo | None:
    """Selects model.attention_impl in this process; with "compiled", returns the kernels for the
    device or raises ``ops.extension.BuildError`` (the compiler's error and the fix): training,
    evaluation and serving never fall back to another implementation.

    ``CCNET_OPS_IMPL`` set to another implementation is an error, so that what runs is what the
    run records; with ``env_override`` (serving a registered model on a machine without a
    compiler) it wins, and says so.
    """
    import os
    import sys

    impl, env = cfg.model.attention_impl, os.environ.get("CCNET_OPS_IMPL")
    if env and env != impl:
        if not env_override:
            raise ValueError(f"CCNET_OPS_IMPL={env} conflicts with model.attention_impl={impl}: unset "
                             f"CCNET_OPS_IMPL, or set model.attention_impl={env}")
        print(f"ops: CCNET_OPS_IMPL={env} overrides the model's attention_impl={impl}", file=sys.stderr)
        impl = env
    ops.set_implementation(impl)
    return ops.require_compiled(device) if impl == "compiled" and uses_attention_op(cfg) else None


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def save_checkpoint(directory: str | Path, *, cfg: PipelineConfig, classes: list[str], model: nn.Module,
                    palette: list | None = None, optimizer=None, scheduler=None, iteration: int,
                    metrics: dict | None = None) -> Path:
    state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    payload = {
        "config": to_dict(cfg), "classes": list(classes),
        "palette": [list(map(int, c)) for c in palette] if palette else None, "model": state, "iteration": int(iteration),
        "metrics": {k: float(v) for k, v in (metrics or {}).items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
    }
    path = Path(directory) / FILENAME
    torch.save(payload, path)
    write_sidecar(path, int(iteration))
    return path


def write_sidecar(path: Path, iteration: int) -> None:
    import hashlib
    import json

    data = path.read_bytes()
    (path.parent / SIDECAR).write_text(json.dumps({"file": FILENAME, "bytes": len(data), "iteration": iteration,
                                                   "sha256": hashlib.sha256(data).hexdigest()}))


def verify(directory: str, filesystem=None) -> dict:
    """The sidecar of the checkpoint in ``directory`` (a local path, a URI, or a path on
    ``filesystem``), after checking the file's size and sha256 against it; raises
    ``DamagedCheckpoint`` saying what is wrong."""
    import hashlib
    import json

    from . import storage

    def read(name: str) -> bytes:
        if filesystem is not None:
            with filesystem.open_input_stream(f"{directory.rstrip('/')}/{name}") as f:
                return f.read()
        return storage.read_bytes(storage.join(directory, name))

    try:
        meta = json.loads(read(SIDECAR))
    except (OSError, ValueError) as exc:
        raise DamagedCheckpoint(f"checkpoint {directory}: its {SIDECAR} is missing or unreadable ({exc})") from None
    try:
        data = read(FILENAME)
    except OSError as exc:
        raise DamagedCheckpoint(f"checkpoint {directory}: {FILENAME} cannot be read ({exc})") from None
    if len(data) != meta["bytes"]:
        raise DamagedCheckpoint(f"checkpoint {directory}: {FILENAME} has {len(data)} bytes, {meta['bytes']} were "
                                "written (truncated)")
    if hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise DamagedCheckpoint(f"checkpoint {directory}: the sha256 of {FILENAME} differs from the one recorded "
                                "when it was written (corrupted)")
    return meta


def for_serving(checkpoint: str | Path, directory: str | Path) -> Path:
    """A copy of the checkpoint for MLflow: weights, config, classes, palette, iteration and
    metrics, without the optimizer and scheduler state; returns its path."""
    ckpt = load_checkpoint(checkpoint)
    ckpt["optimizer"] = ckpt["scheduler"] = None
    path = Path(directory) / FILENAME
    torch.save(ckpt, path)
    write_sidecar(path, ckpt["iteration"])
    return path


def load_checkpoint(path: str | Path) -> dict:
    """The checkpoint's contents; ``path`` is the file or its directory, local or a URI on the
    run's storage (``s3://...``). Never runs pickled code."""
    import io

    from . import storage

    location = str(path)
    if not storage.is_local_fs(location):
        file = location if location.endswith(FILENAME) else storage.join(location, FILENAME)
        if not storage.exists(file):
            raise FileNotFoundError(f"checkpoint {file} not found")
        source, shown = io.BytesIO(storage.read_bytes(file)), file
    else:
        shown = Path(storage.resolve(location)[1])
        if shown.is_dir():
            shown = shown / FILENAME
        if not shown.is_file():
            raise FileNotFoundError(f"checkpoint {shown} not found")
        source = shown
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError (or others) for unsafe or broken files
        raise ValueError(f"refusing to load {shown}: it is not a plain-data checkpoint "
                         f"(torch.load weights_only=True failed: {str(exc).splitlines()[0]})") from None


def model_from_checkpoint(ckpt: dict) -> tuple[nn.Module, PipelineConfig]:
    """The model of a loaded checkpoint, in eval mode, and its config."""
    cfg = from_dict(ckpt["config"])
    model = model_from_config(cfg, len(ckpt["classes"]), pretrained=False)
    model.load_state_dict(ckpt["model"])
    return model.eval(), cfg
