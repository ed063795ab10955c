"""Predict label maps with a registered model or a checkpoint.

    python -m pipeline.predict --model models:/ccnet@champion --input photos/ --out predictions/
    python -m pipeline.predict --model runs/train-<key>/final_checkpoint --input a.png b.jpg --out out/

For every input image: ``<stem>_label.png`` (class ids, 255 = ignore) and ``<stem>_overlay.png``
(the prediction's colours over the image). The model's inference settings (sliding window,
scales, flip) come from its config; the palette from the registered run or the checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

from .checkpoint import load_checkpoint, model_from_checkpoint
from .evaluate import inference_config, overlay
from .serving import predict_labels
from .tracking import default_tracking_uri

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def resolve_checkpoint(model: str, tracking_uri: str | None) -> Path:
    """A local checkpoint path for a ``models:/`` URI (downloaded) or a path."""
    if model.startswith(("models:/", "runs:/")):
        import mlflow

        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{model.rstrip('/')}/artifacts"))
        found = sorted(local.rglob("checkpoint.pt"))
        if not found:
            raise FileNotFoundError(f"{model} holds no checkpoint.pt")
        return found[0]
    return Path(model)


def input_files(inputs: list[str]) -> list[Path]:
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"input {item} does not exist")
    if not files:
        raise FileNotFoundError(f"no images in {inputs}")
    return files


def palette_for(num_classes: int, ckpt: dict) -> list:
    from data_prep.sources.ade20k import random_palette

    return ckpt.get("palette") or list(random_palette(num_classes))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION or a checkpoint")
    p.add_argument("--input", nargs="+", required=True, help="image files or directories")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or ./mlflow.db)")
    args = p.parse_args(argv)
    try:
        uri = args.tracking_uri or default_tracking_uri()
        ckpt = load_checkpoint(resolve_checkpoint(args.model, uri))
        files = input_files(args.input)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model, cfg = model_from_checkpoint(ckpt)
    palette = palette_for(len(ckpt["classes"]), ckpt)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path in files:
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            print(f"skipped {path}: not a readable image", file=sys.stderr)
            continue
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        label = predict_labels(model, rgb, inference_config(cfg))[0]
        cv2.imwrite(str(out / f"{path.stem}_label.png"), label)
        cv2.imwrite(str(out / f"{path.stem}_overlay.png"), cv2.cvtColor(overlay(rgb, label, palette), cv2.COLOR_RGB2BGR))
        print(f"{path} -> {out / (path.stem + '_label.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
