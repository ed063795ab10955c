"""Evaluation of a checkpoint over the whole validation split, with the configured inference
(whole image or sliding window, scales, flip): per-class IoU, mIoU, the confusion matrix, and a
few prediction overlays."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import torch

from ccnet import ConfusionMatrix, InferenceConfig, predict

from .checkpoint import load_checkpoint, model_from_checkpoint, select_attention
from .config import PipelineConfig


def eval_precision(cfg: PipelineConfig, device: torch.device | str) -> str:
    """eval.amp, else the training's precision on CUDA and float32 on the CPU."""
    if cfg.eval.amp is not None:
        return cfg.eval.amp
    return cfg.train.amp if torch.device(device).type == "cuda" else "none"


def inference_config(cfg: PipelineConfig, device: torch.device | str = "cpu") -> InferenceConfig:
    e = cfg.eval
    return InferenceConfig(mode=e.mode, crop=e.crop, stride=e.stride, scales=tuple(e.scales), flip=e.flip,
                           amp=eval_precision(cfg, device))


def colorize(label: np.ndarray, palette: list) -> np.ndarray:
    """(H, W) ids -> (H, W, 3) RGB; 255 (ignore) black."""
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(palette)] = np.asarray(palette, np.uint8)
    return lut[label]


def overlay(image_rgb: np.ndarray, label: np.ndarray, palette: list, alpha: float = 0.5) -> np.ndarray:
    return (image_rgb * (1 - alpha) + colorize(label, palette) * alpha).astype(np.uint8)


def denormalize(image: np.ndarray, mean, std) -> np.ndarray:
    """(3, H, W) normalised float -> (H, W, 3) uint8 RGB."""
    rgb = image.transpose(1, 2, 0) * np.asarray(std) + np.asarray(mean)
    return np.clip(rgb * 255 + 0.5, 0, 255).astype(np.uint8)


def confusion_image(mat: np.ndarray, cell: int = 24) -> np.ndarray:
    """Row-normalised confusion matrix as a heat map (rows: truth, columns: prediction), BGR."""
    rows = mat.sum(1, keepdims=True)
    norm = np.divide(mat, rows, out=np.zeros(mat.shape, float), where=rows > 0)
    heat = cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_VIRIDIS)
    return cv2.resize(heat, (mat.shape[1] * cell, mat.shape[0] * cell), interpolation=cv2.INTER_NEAREST)


def same_size_batches(rows, batch_size: int):
    """Lists of consecutive rows whose images share one size, at most batch_size long."""
    batch: list[dict] = []
    for row in rows:
        if batch and (len(batch) == batch_size or batch[0]["image"].shape != row["image"].shape):
            yield batch
            batch = []
        batch.append(row)
    if batch:
        yield batch


def evaluate_checkpoint(checkpoint: str | Path, prepared: str, split: str, cfg: PipelineConfig,
                        out_dir: str | Path, *, device: str | None = None) -> dict:
    """Scores the checkpoint on the split; writes metrics.json, iou.md, confusion.png, overlays/."""
    from data_prep.loader import eval_dataset
    from data_prep.shards import read_manifest
    from data_prep.transforms import IMAGENET_MEAN, IMAGENET_STD

    out = Path(out_dir)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, _ = model_from_checkpoint(load_checkpoint(checkpoint))
    select_attention(cfg, device)
    model.to(device)
    manifest = read_manifest(prepared)
    classes, palette = manifest["classes"], manifest["palette"]
    cm = ConfusionMatrix(len(classes), device=device)
    inference, drawn = inference_config(cfg, device), 0
    for rows in same_size_batches(eval_dataset(prepared, split).iter_rows(), cfg.eval.batch_size):
        images = torch.as_tensor(np.stack([row["image"] for row in rows]), device=device)
        preds = predict(model, images, inference).argmax(1)
        for row, pred in zip(rows, preds):
            cm.update(pred, torch.as_tensor(row["label"], device=device))
            if drawn < cfg.eval.overlays:
                rgb = denormalize(row["image"], IMAGENET_MEAN, IMAGENET_STD)
                both = np.concatenate([overlay(rgb, row["label"], palette), overlay(rgb, pred.cpu().numpy(), palette)], 1)
                cv2.imwrite(str(out / "overlays" / f"{row['key']}.png"), cv2.cvtColor(both, cv2.COLOR_RGB2BGR))
                drawn += 1
    summary = cm.summary()
    mat = cm.mat.cpu().numpy()
    cv2.imwrite(str(out / "confusion.png"), confusion_image(mat))
    lines = ["| class | IoU |", "|---|---|"] + [
        f"| {name} | {'n/a' if iou is None else f'{iou:.4f}'} |" for name, iou in zip(classes, summary["iou"])]
    (out / "iou.md").write_text("\n".join(lines) + f"\n\nmIoU {summary['miou']:.4f}, pixel accuracy "
                                f"{summary['pixel_accuracy']:.4f}\n")
    result = {"miou": summary["miou"], "pixel_accuracy": summary["pixel_accuracy"],
              "iou": dict(zip(classes, summary["iou"])), "confusion": mat.tolist()}
    (out / "metrics.json").write_text(json.dumps(result, indent=1))
    return result
