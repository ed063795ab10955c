"""Evaluation of a checkpoint over the whole validation split, with the configured inference
(whole image or sliding window, scales, flip): per-class IoU, mIoU, the confusion matrix, and a
few prediction overlays."""

from __future__ import annotations

import json
from pathlib import Path

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


def protocol(cfg: PipelineConfig, manifest: dict, split: str, precision: str, mode: str | None = None) -> str:
    """How a score was measured, as a readable string: the inference (mode, window, scales,
    flip, precision) and the validation data (split and the digest of its shards). Scores are
    compared only under the same protocol."""
    from .tracking import split_digest

    e = cfg.eval
    mode = mode or e.mode
    window = f" crop={e.crop} stride={e.stride}" if mode == "slide" else ""
    scales = ",".join(f"{x:g}" for x in e.scales) if mode == e.mode else "1"
    flip = e.flip if mode == e.mode else False
    return f"{mode}{window} scales={scales} flip={str(flip).lower()} amp={precision} " \
           f"data={split}@{split_digest(manifest, split)}"


def object_pixel(label: np.ndarray, background: int = 0) -> tuple[int, int] | None:
    """One object pixel of a label map: the pixel of its rarest labelled class (not the
    background class 0, nor 255) nearest to that class's centroid; None when there is none."""
    classes, counts = np.unique(label[(label != 255) & (label != background)], return_counts=True)
    if not len(classes):
        return None
    ys, xs = np.nonzero(label == classes[np.argmin(counts)])
    i = np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2)
    return int(ys[i]), int(xs[i])


def draw_attention(model, row: dict, classes: list[str], folder: Path) -> bool:
    """The attention of one object pixel of the row's image after each criss-cross pass, over
    the image (``attention/<key>.png``); False when the model has no criss-cross pass or the
    image no object pixel."""
    from ccnet import CrissCrossAttention, attention_maps
    from data_prep.transforms import IMAGENET_MEAN, IMAGENET_STD

    from . import figures

    head = getattr(model, "head", None)
    passes = getattr(head, "recurrence", 0)
    if not passes or not any(isinstance(m, CrissCrossAttention) for m in getattr(head, "attention", ())):
        return False
    pixel = object_pixel(row["label"])
    if pixel is None:
        return False
    device = next(model.parameters()).device
    image = torch.as_tensor(row["image"], device=device)[None].float()
    maps = attention_maps(model, image, pixel, image_pixel=True)
    folder.mkdir(parents=True, exist_ok=True)
    rgb = denormalize(row["image"], IMAGENET_MEAN, IMAGENET_STD)
    cls = classes[int(row["label"][pixel])] if int(row["label"][pixel]) < len(classes) else "?"
    figures.save(figures.attention_figure(rgb, [m[0].cpu().numpy() for m in maps], pixel,
                                          title=f"{row['key']}: where a pixel of {cls} looks, pass by pass"),
                 folder / f"{row['key']}.png")
    return True


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
    """Scores the checkpoint on the split; writes metrics.json, iou.md, the figures confusion.png
    and iou.png, and overlays/ (image, ground truth, prediction, legend)."""
    from data_prep.loader import eval_dataset
    from data_prep.shards import read_manifest
    from data_prep.transforms import IMAGENET_MEAN, IMAGENET_STD

    from . import figures

    out = Path(out_dir)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, _ = model_from_checkpoint(load_checkpoint(checkpoint))
    select_attention(cfg, device)
    model.to(device)
    manifest = read_manifest(prepared)
    classes, palette = manifest["classes"], manifest["palette"]
    cm = ConfusionMatrix(len(classes), device=device)
    inference, drawn, mapped = inference_config(cfg, device), 0, 0
    for rows in same_size_batches(eval_dataset(prepared, split).iter_rows(), cfg.eval.batch_size):
        images = torch.as_tensor(np.stack([row["image"] for row in rows]), device=device)
        preds = predict(model, images, inference).argmax(1)
        for row, pred in zip(rows, preds):
            cm.update(pred, torch.as_tensor(row["label"], device=device))
            if drawn < cfg.eval.overlays:
                rgb = denormalize(row["image"], IMAGENET_MEAN, IMAGENET_STD)
                figures.save(figures.overlay_figure(rgb, row["label"], pred.cpu().numpy(), classes, palette,
                                                    title=str(row["key"])), out / "overlays" / f"{row['key']}.png")
                drawn += 1
            if mapped < cfg.eval.attention_maps and draw_attention(model, row, classes, out / "attention"):
                mapped += 1
    summary = cm.summary()
    mat = cm.mat.cpu().numpy()
    figures.save(figures.confusion_figure(mat, classes), out / "confusion.png")
    figures.save(figures.iou_figure(dict(zip(classes, summary["iou"])), summary["miou"]), out / "iou.png")
    lines = ["| class | IoU |", "|---|---|"] + [
        f"| {name} | {'n/a' if iou is None else f'{iou:.4f}'} |" for name, iou in zip(classes, summary["iou"])]
    (out / "iou.md").write_text("\n".join(lines) + f"\n\nmIoU {summary['miou']:.4f}, pixel accuracy "
                                f"{summary['pixel_accuracy']:.4f}\n")
    result = {"miou": summary["miou"], "pixel_accuracy": summary["pixel_accuracy"],
              "iou": dict(zip(classes, summary["iou"])), "confusion": mat.tolist(),
              "protocol": protocol(cfg, manifest, split, inference.amp)}
    (out / "metrics.json").write_text(json.dumps(result, indent=1))
    return result


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
