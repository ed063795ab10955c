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

from .evaluate import inference_device, predict_labels


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
