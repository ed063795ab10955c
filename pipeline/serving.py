"""The model as MLflow logs and serves it: a pyfunc over a plain-data checkpoint.

``mlflow.pyfunc.load_model("models:/ccnet@champion").predict(images)`` takes a batch of RGB
uint8 images (N, H, W, 3) and returns label maps (N, H, W) uint8, with the inference the
pipeline evaluated with: on CUDA when a GPU is visible (``CCNET_DEVICE=cpu`` forces the CPU), in
batches of eval.batch_size, under autocast as eval.amp says. The checkpoint inside is loaded
with ``weights_only=True``.
"""

from __future__ import annotations

import mlflow.pyfunc
import numpy as np
import torch


class CCNetPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        import os

        from .checkpoint import load_checkpoint, model_from_checkpoint, select_attention
        from .evaluate import inference_config

        self.model, cfg = model_from_checkpoint(load_checkpoint(context.artifacts["checkpoint"]))
        self.device = inference_device(os.environ.get("CCNET_DEVICE"))
        select_attention(cfg, self.device, env_override=True)
        self.model.to(self.device)
        self.inference = inference_config(cfg, self.device)
        self.batch_size = cfg.eval.batch_size

    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        return predict_labels(self.model, np.asarray(model_input), self.inference, batch_size=self.batch_size)


def inference_device(name: str | None = None) -> torch.device:
    """``name`` ("cuda", "cuda:1", "cpu"), else CUDA when a GPU is visible and the CPU otherwise."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but PyTorch sees no CUDA device here")
    return device


def predict_labels(model, images: np.ndarray, inference, *, batch_size: int = 4) -> np.ndarray:
    """(N, H, W, 3) or (H, W, 3) uint8 RGB -> (N, H, W) uint8 labels, ``batch_size`` images per
    forward, on the model's device."""
    from ccnet import predict
    from data_prep.transforms import normalize

    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected RGB images (N, H, W, 3), got shape {images.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    labels = []
    for i in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.stack([normalize(im.astype(np.uint8)) for im in images[i:i + batch_size]]))
        labels.append(predict(model, batch.to(device), inference).argmax(1).byte().cpu().numpy())
    return np.concatenate(labels)
