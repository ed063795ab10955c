"""The model as MLflow logs and serves it: a pyfunc over a plain-data checkpoint.

``mlflow.pyfunc.load_model("models:/ccnet@champion").predict(images)`` takes a batch of RGB
uint8 images (N, H, W, 3) and returns label maps (N, H, W) uint8, with the inference the
pipeline evaluated with. The checkpoint inside is loaded with ``weights_only=True``.
"""

from __future__ import annotations

import mlflow.pyfunc
import numpy as np
import torch


class CCNetPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from .checkpoint import load_checkpoint, model_from_checkpoint
        from .evaluate import inference_config

        self.model, cfg = model_from_checkpoint(load_checkpoint(context.artifacts["checkpoint"]))
        self.inference = inference_config(cfg)

    def predict(self, context, model_input, params=None) -> np.ndarray:
        return predict_labels(self.model, np.asarray(model_input), self.inference)


def predict_labels(model, images: np.ndarray, inference) -> np.ndarray:
    """(N, H, W, 3) or (H, W, 3) uint8 RGB -> (N, H, W) uint8 labels."""
    from ccnet import predict
    from data_prep.transforms import normalize

    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected RGB images (N, H, W, 3), got shape {images.shape}")
    batch = torch.from_numpy(np.stack([normalize(im.astype(np.uint8)) for im in images]))
    device = next(model.parameters()).device
    return predict(model, batch.to(device), inference).argmax(1).byte().cpu().numpy()
