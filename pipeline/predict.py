"""Predict label maps with a registered model or a checkpoint.

    python -m pipeline.predict --model models:/ccnet@champion --input photos/ --out predictions/
    python -m pipeline.predict --model runs/train-<key>/final_checkpoint --input a.png b.jpg --out out/

For every input image: ``<stem>_label.png`` (class ids, 255 = ignore) and ``<stem>_overlay.png``
(the prediction's colours over the image). The model's inference settings (sliding window,
scales, flip, precision, batch size) come from its config; the palette from the registered run
or the checkpoint. It runs on CUDA when a GPU is visible (``--device cpu`` to stay on the CPU),
images of one size ``--batch-size`` at a time, under autocast as ``--amp`` (default: eval.amp,
else the training's precision on CUDA and float32 on the CPU).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

from .checkpoint import load_checkpoint, model_from_checkpoint, select_attention
from .evaluate import inference_config, inference_device, overlay, predict_labels, same_size_batches
from .tracking import default_tracking_uri

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def resolve_checkpoint(model: str, tracking_uri: str | None) -> Path | str:
    """A local checkpoint path for a ``models:/`` URI (downloaded), else the path or storage URI
    (``s3://.../final_checkpoint``) as given."""
    if model.startswith(("models:/", "runs:/")):
        import mlflow
        from mlflow.exceptions import MlflowException

        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{model.rstrip('/')}/artifacts"))
        except MlflowException as exc:
            raise FileNotFoundError(f"{model} cannot be loaded from {tracking_uri or mlflow.get_tracking_uri()}: "
                                    f"{str(exc).splitlines()[0]} (registered models there: "
                                    f"{registered_names(tracking_uri) or 'none'})") from None
        found = sorted(local.rglob("checkpoint.pt"))
        if not found:
            raise FileNotFoundError(f"{model} holds no checkpoint.pt")
        return found[0]
    return model if "://" in model else Path(model)


def registered_names(tracking_uri: str | None) -> str:
    """The registered models' names, with their aliases, at the tracking URI (for an error)."""
    from mlflow.tracking import MlflowClient

    try:
        models = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri).search_registered_models()
    except Exception:  # noqa: BLE001 (the error being reported is the user's; this list only helps)
        return ""
    return ", ".join(m.name + "".join(f" @{a}" for a in (m.aliases or {})) for m in models)


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


def read_images(files: list[Path]):
    """{"path", "image" (RGB)} per readable file, in order; an unreadable one is reported and skipped."""
    for path in files:
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            print(f"skipped {path}: not a readable image", file=sys.stderr)
            continue
        yield {"path": path, "image": cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)}


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(prog="python -m pipeline.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION or a checkpoint")
    p.add_argument("--input", nargs="+", required=True, help="image files or directories")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda, cuda:N or cpu (default: cuda when a GPU is visible, else cpu)")
    p.add_argument("--batch-size", type=int, help="images per forward (default: the model's eval.batch_size)")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"],
                   help="autocast precision (default: eval.amp, else train.amp on CUDA and none on the CPU)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        uri = args.tracking_uri or default_tracking_uri()
        ckpt = load_checkpoint(resolve_checkpoint(args.model, uri))
        files = input_files(args.input)
        device = inference_device(args.device)
        if args.batch_size is not None and args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model, cfg = model_from_checkpoint(ckpt)
    if args.amp is not None:
        cfg.eval.amp = args.amp
    select_attention(cfg, device, env_override=True)
    model.to(device)
    inference, batch_size = inference_config(cfg, device), args.batch_size or cfg.eval.batch_size
    palette = palette_for(len(ckpt["classes"]), ckpt)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"predicting on {device} ({inference.amp if inference.amp != 'none' else 'float32'}, "
          f"batches of up to {batch_size})", file=sys.stderr)
    for batch in same_size_batches(read_images(files), batch_size):
        labels = predict_labels(model, np.stack([row["image"] for row in batch]), inference, batch_size=batch_size)
        for path, rgb, label in ((row["path"], row["image"], label) for row, label in zip(batch, labels)):
            cv2.imwrite(str(out / f"{path.stem}_label.png"), label)
            cv2.imwrite(str(out / f"{path.stem}_overlay.png"),
                        cv2.cvtColor(overlay(rgb, label, palette), cv2.COLOR_RGB2BGR))
            print(f"{path} -> {out / (path.stem + '_label.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
