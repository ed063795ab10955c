"""Why does one criss-cross pass learn so little on the synthetic default? A study without Ray.

    python -m benchmarks.recurrence_study --device cuda --seeds 0 1 2 \\
        --variant R=0 --variant R=1 --variant R=2 --variant R=1,gamma=1 --out study.jsonl

Trains the default config's model (tiny backbone, RCCA head, aux head) with the pipeline's own
step (``pipeline.train.train_step``: the same loss, SGD, poly schedule and learning rate) on the
synthetic default (256 training and 64 validation images, 96 x 96, no augmentation: the default
crops the whole image), in one process: one batch of ``train.batch_size x scaling.num_workers``
images per step, the global batch of the pipeline's 2-worker DDP run, in a seeded order per
epoch. Unlike the pipeline, BatchNorm normalises the 16 images together (each DDP worker
normalises its 8), the data order is the study's own, and on a GPU the convolutions may run in
TF32 (PyTorch's default): compare the variants with each other, not with a pipeline run. A
variant sets ``R`` (``model.recurrence``), ``non_local`` (one dense non-local block), and
``gamma``, the initial value of every attention module's gamma (``model.gamma_init``; 0, the
paper's code, unless the variant names it). Every ``--every`` iterations it records, on the
validation split:

- ``miou``: whole-image mIoU;
- ``gamma``: the attention's gamma (the first module's);
- ``object_acc``: pixel accuracy on the objects (their key strips excluded);
- ``object_acc_no_keys``: the same with every key strip painted over with background grey;
  chance among the K - 1 object classes is 1 / (K - 1). A model far above chance with the keys
  and at chance without them owes the difference to the keys.

``--data FILE.npz`` reads the images and labels from a file written by ``--write-data``, for a
machine without OpenCV; otherwise they are generated here, as ``data_prep`` generates them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from ccnet import CCNetLoss, ConfusionMatrix, whole
from ccnet.attention import CrissCrossAttention
from data_prep.sources.synthetic import KEY_WIDTH, SyntheticConfig, generate
from data_prep.transforms import normalize
from pipeline.checkpoint import model_from_config, select_attention
from pipeline.config import load_config
from pipeline.train import make_optimizer, train_step


def load_data(path: str | None) -> dict[str, np.ndarray]:
    if path:
        with np.load(path) as f:
            return dict(f)
    cfg = SyntheticConfig()
    out = {}
    for split, n in cfg.samples:
        pairs = [generate(cfg, split, i) for i in range(n)]
        out[f"{split}_image"] = np.stack([normalize(img) for img, _ in pairs])
        out[f"{split}_label"] = np.stack([lab for _, lab in pairs])
    return out


def parse_variant(text: str) -> dict:
    """"R=1", "R=1,gamma=1" or "non_local,gamma=1" (one dense non-local block)."""
    out = {"R": 2, "gamma": 0.0, "attention": "cca"}
    for part in text.split(","):
        if part.strip() == "non_local":
            out.update(R=1, attention="non_local")
            continue
        key, value = part.split("=")
        out[key.strip()] = float(value) if key.strip() == "gamma" else int(value)
    return out


def key_strips(labels: torch.Tensor) -> torch.Tensor:
    """(N, S, S) bool: the key strips, the labelled pixels of the 8-pixel border bands."""
    band = torch.zeros_like(labels, dtype=torch.bool)
    band[:, :KEY_WIDTH, :] = True
    band[:, :, :KEY_WIDTH] = True
    return band & (labels > 0)


@torch.no_grad()
def measure(model, images, labels, num_classes: int) -> dict:
    model.eval()
    pred = whole(model, images).argmax(1)
    cm = ConfusionMatrix(num_classes, device=images.device)
    cm.update(pred, labels)
    keys = key_strips(labels)
    objects = (labels > 0) & ~keys
    grey = torch.tensor(normalize(np.full((1, 1, 3), 90, np.uint8))[:, 0, 0], device=images.device)
    blanked = torch.where(keys[:, None], grey.view(1, 3, 1, 1), images)
    pred_blank = whole(model, blanked).argmax(1)
    out = {"miou": cm.miou(), "object_acc": float((pred == labels)[objects].float().mean()),
           "object_acc_no_keys": float((pred_blank == labels)[objects].float().mean())}
    module = next((m for m in model.modules() if isinstance(m, CrissCrossAttention)), None)
    if module is not None:
        out["gamma"] = float(module.gamma)
    return out


def run(variant: dict, seed: int, iterations: int, every: int, data: dict, device: torch.device) -> dict:
    cfg = load_config("default", [f"model.recurrence={variant['R']}", f"model.attention={variant['attention']}",
                                  f"model.gamma_init={variant['gamma']}", f"train.iterations={iterations}",
                                  f"train.seed={seed}"])
    t = cfg.train
    torch.manual_seed(seed)
    model = model_from_config(cfg, 5, pretrained=False).to(device)
    if cfg.model.recurrence and cfg.model.attention == "cca":
        select_attention(cfg, device)
    optimizer, scheduler = make_optimizer(cfg, model)
    criterion = CCNetLoss(aux_weight=t.aux_weight, ohem=t.ohem)
    scaler = torch.amp.GradScaler(enabled=False)
    train_x = torch.from_numpy(data["train_image"]).to(device)
    train_y = torch.from_numpy(data["train_label"]).long().to(device)
    val_x = torch.from_numpy(data["val_image"]).to(device)
    val_y = torch.from_numpy(data["val_label"]).long().to(device)
    batch = t.batch_size * cfg.scaling.num_workers
    rng = np.random.default_rng(seed)
    history, it, start = [], 0, time.perf_counter()
    while it < iterations:
        order = rng.permutation(len(train_x))
        for b in range(len(order) // batch):
            idx = torch.from_numpy(order[b * batch:(b + 1) * batch]).to(device)
            train_step(model, criterion, optimizer, scheduler, scaler, train_x[idx], train_y[idx], "none")
            it += 1
            if it % every == 0 or it == iterations:
                history.append({"iteration": it, **measure(model, val_x, val_y, 5)})
            if it == iterations:
                break
    return {"variant": variant, "seed": seed, "iterations": iterations,
            "seconds": time.perf_counter() - start, "history": history}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.recurrence_study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", action="append", default=[], help="R=1 or R=1,gamma=1 (repeatable)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--iterations", type=int, default=2000)
    p.add_argument("--every", type=int, default=250)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data", help="an .npz written by --write-data (no OpenCV needed)")
    p.add_argument("--write-data", help="write the synthetic default's arrays to this .npz and stop")
    p.add_argument("--out", help="append one JSON line per run to this file")
    args = p.parse_args(argv)
    data = load_data(args.data)
    if args.write_data:
        np.savez_compressed(args.write_data, **data)
        return 0
    for text in args.variant or ["R=2"]:
        for seed in args.seeds:
            result = run(parse_variant(text), seed, args.iterations, args.every, data, torch.device(args.device))
            last = result["history"][-1]
            print(f"{text:>12} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in last.items()
                                                        if k != "iteration") + f" ({result['seconds']:.0f} s)",
                  flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
