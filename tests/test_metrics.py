"""Metrics against numpy, the official Cityscapes evaluation, and across DDP ranks."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ccnet.metrics import ConfusionMatrix


def numpy_scores(pred: np.ndarray, gt: np.ndarray, K: int):
    """Per-class IoU by counting sets of pixels, independently of the confusion matrix."""
    valid = gt != 255
    ious = []
    for c in range(K):
        p, g = (pred == c) & valid, (gt == c) & valid
        union = np.logical_or(p, g).sum()
        ious.append(np.nan if union == 0 else np.logical_and(p, g).sum() / union)
    acc = (pred[valid] == gt[valid]).mean()
    return np.array(ious), acc


def random_maps(K: int, seed: int, shape=(3, 17, 23)):
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, K, shape)
    pred = np.where(rng.random(shape) < 0.6, gt, rng.integers(0, K, shape))
    gt[rng.random(shape) < 0.1] = 255
    return pred, gt


def test_scores_match_numpy():
    K = 6
    pred, gt = random_maps(K, 0)
    gt[gt == 4] = 255  # class 4 absent from the labels...
    pred[pred == 4] = 0  # ...and from the predictions: no IoU
    pred[pred == 5] = 3  # class 5 labelled but never predicted: IoU 0
    cm = ConfusionMatrix(K)
    for i in range(3):  # accumulate over batches
        cm.update(torch.from_numpy(pred[i]), torch.from_numpy(gt[i]))
    ious, acc = numpy_scores(pred, gt, K)
    got = cm.iou().numpy()
    assert np.isnan(got[4]) and np.isnan(ious[4])
    assert got[5] == 0
    np.testing.assert_allclose(got, ious, equal_nan=True)
    assert math.isclose(cm.miou(), np.nanmean(ious))
    assert math.isclose(cm.pixel_accuracy(), acc)
    summary = cm.summary()
    assert summary["iou"][4] is None and summary["miou"] == cm.miou()


def test_bad_labels_raise():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="label values"):
        cm.update(torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 3, 255]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(4, dtype=torch.long), torch.zeros(5, dtype=torch.long))


def test_matches_official_cityscapes_evaluation(tmp_path):
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official
    from cityscapesscripts.helpers.labels import trainId2label

    K = 19
    pred, gt = random_maps(K, 1, shape=(2, 32, 48))
    to_label_ids = np.zeros(256, dtype=np.uint8)  # trainId -> labelId; 255 -> 0 ("unlabeled")
    for train_id in range(K):
        to_label_ids[train_id] = trainId2label[train_id].id
    pred_files, gt_files = [], []
    for i in range(len(pred)):
        p, g = tmp_path / f"pred_{i}.png", tmp_path / f"gt_{i}_gtFine_labelIds.png"
        cv2.imwrite(str(p), to_label_ids[pred[i]])
        cv2.imwrite(str(g), to_label_ids[gt[i]])
        pred_files.append(str(p))
        gt_files.append(str(g))
    args = official.CArgs()
    for key, value in vars(official.args).items():
        setattr(args, key, value)
    args.evalInstLevelScore, args.JSONOutput, args.quiet = False, False, True
    result = official.evaluateImgLists(pred_files, gt_files, args)

    cm = ConfusionMatrix(K)
    cm.update(torch.from_numpy(pred), torch.from_numpy(gt))
    ours = cm.iou().numpy()
    theirs = np.array([result["classScores"][trainId2label[c].name] for c in range(K)])
    np.testing.assert_allclose(ours, theirs, equal_nan=True)
    assert math.isclose(cm.miou(), result["averageScoreClasses"])


def _rank(rank: int, world: int, port: int, pred, gt, out) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cm = ConfusionMatrix(5)
    cm.update(torch.from_numpy(pred[rank]), torch.from_numpy(gt[rank]))  # each rank: its half
    cm.all_reduce()
    out[rank] = cm.mat.clone()
    dist.destroy_process_group()


def test_all_reduce_across_ranks():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pred, gt = random_maps(5, 2, shape=(2, 16, 16))
    out = mp.Manager().dict()
    mp.spawn(_rank, args=(2, port, pred, gt, out), nprocs=2, join=True)
    whole = ConfusionMatrix(5)
    whole.update(torch.from_numpy(pred), torch.from_numpy(gt))
    assert torch.equal(out[0], whole.mat) and torch.equal(out[1], whole.mat)
