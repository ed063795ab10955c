"""The figures a run shows in MLflow, drawn with matplotlib (the Agg backend: no display needed).

- ``confusion_figure``: the row-normalised confusion matrix, class names on both axes, a colour bar.
- ``iou_figure``: per-class IoU as horizontal bars, the mIoU as a line.
- ``overlay_figure``: image, ground truth and prediction side by side, with the classes' legend.
- ``attention_figure``: where one pixel looks after each criss-cross pass, over the image.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Patch


def _colour(palette_entry) -> tuple[float, float, float]:
    return tuple(c / 255 for c in palette_entry)


def confusion_figure(mat: np.ndarray, classes: list[str]):
    """Rows: ground truth, columns: prediction, each row divided by its pixel count."""
    rows = mat.sum(1, keepdims=True)
    norm = np.divide(mat, rows, out=np.zeros(mat.shape, float), where=rows > 0)
    n = len(classes)
    side = min(4 + 0.45 * n, 40)
    fig, ax = plt.subplots(figsize=(side + 1.5, side), dpi=100)
    im = ax.imshow(norm, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=60, ha="right", fontsize=8 if n > 20 else 10)
    ax.set_yticks(range(n), classes, fontsize=8 if n > 20 else 10)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title("confusion matrix (each row sums to 1)")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] < 0.6 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the row's pixels")
    fig.tight_layout()
    return fig


def iou_figure(iou: dict[str, float | None], miou: float):
    names = list(iou)
    values = [np.nan if v is None else v for v in iou.values()]
    fig, ax = plt.subplots(figsize=(7, 1.5 + 0.3 * len(names)), dpi=100)
    ax.barh(range(len(names)), values, color="tab:blue")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.axvline(miou, color="tab:red", linestyle="--", label=f"mIoU {miou:.3f}")
    for i, v in enumerate(values):
        missing = bool(np.isnan(v))
        ax.text(0.01 if missing else min(v, 0.9) + 0.01, i, "n/a" if missing else f"{v:.3f}", va="center", fontsize=8)
    ax.set_xlabel("IoU")
    ax.set_title("per-class IoU on the validation split")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def overlay_figure(rgb: np.ndarray, truth: np.ndarray, pred: np.ndarray, classes: list[str], palette: list,
                   title: str = ""):
    """Three panels (image, ground truth, prediction) and a legend of the classes present."""
    from .evaluate import colorize

    fig, axes = plt.subplots(1, 3, figsize=(12, 4.6), dpi=100)
    for ax, img, name in zip(axes, (rgb, colorize(truth, palette), colorize(pred, palette)),
                             ("image", "ground truth", "prediction")):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    present = sorted((set(np.unique(truth).tolist()) | set(np.unique(pred).tolist())) - {255})
    present = [c for c in present if c < len(classes)]
    fig.legend(handles=[Patch(color=_colour(palette[c]), label=classes[c]) for c in present],
               loc="lower center", ncol=min(len(present), 8) or 1, fontsize=9, frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    return fig


def attention_figure(rgb: np.ndarray, maps: list[np.ndarray], pixel: tuple[int, int], title: str = ""):
    """The image, then each pass's attention of ``pixel`` (row, col) over it, upsampled."""
    import cv2

    h, w = rgb.shape[:2]
    fig, axes = plt.subplots(1, 1 + len(maps), figsize=(4 * (1 + len(maps)), 4.4), dpi=100)
    axes[0].imshow(rgb)
    axes[0].set_title("image")
    for i, (ax, m) in enumerate(zip(axes[1:], maps), start=1):
        up = cv2.resize(m.astype(np.float32), (w, h), interpolation=cv2.INTER_NEAREST)
        ax.imshow(rgb)
        im = ax.imshow(up / max(up.max(), 1e-12), cmap="jet", alpha=0.55, vmin=0, vmax=1)
        ax.set_title(f"after pass {i}")
    for ax in axes:
        ax.plot(pixel[1], pixel[0], marker="+", color="white", markersize=14, mew=2)
        ax.axis("off")
    fig.colorbar(im, ax=list(axes), fraction=0.02, pad=0.01, label="attention (scaled to its maximum)")
    if title:
        fig.suptitle(title)
    return fig


def save(fig, path: str | Path) -> Path:
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def to_array(fig) -> np.ndarray:
    """The figure as an (H, W, 3) uint8 RGB array (for ``MlflowClient.log_image``)."""
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    plt.close(fig)
    return rgba[..., :3].copy()
