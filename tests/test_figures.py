"""The figures logged to MLflow say what they show: labels, scales, legends, and the right numbers."""

from __future__ import annotations

import numpy as np

from pipeline import figures

CLASSES = ["road", "car", "person"]
PALETTE = [[128, 64, 128], [0, 0, 142], [220, 20, 60]]


def test_confusion_figure_is_row_normalised_and_labelled():
    mat = np.array([[8, 2, 0], [1, 3, 0], [0, 0, 0]])
    fig = figures.confusion_figure(mat, CLASSES)
    ax, bar = fig.axes  # the matrix and its colour bar
    assert [t.get_text() for t in ax.get_xticklabels()] == CLASSES
    assert [t.get_text() for t in ax.get_yticklabels()] == CLASSES
    assert ax.get_xlabel() == "prediction" and ax.get_ylabel() == "ground truth"
    shown = ax.images[0].get_array()
    np.testing.assert_allclose(shown, [[0.8, 0.2, 0], [0.25, 0.75, 0], [0, 0, 0]])  # a class absent: zeros
    assert bar.get_ylabel() and ax.images[0].get_clim() == (0, 1)
    assert "0.75" in {t.get_text() for t in ax.texts}
    rgb = figures.to_array(fig)
    assert rgb.ndim == 3 and min(rgb.shape[:2]) >= 300


def test_iou_figure_shows_each_class_and_the_mean():
    iou = {"road": 0.9, "car": 0.5, "person": None}
    fig = figures.iou_figure(iou, 0.7)
    ax = fig.axes[0]
    heights = [p.get_width() for p in ax.patches]
    np.testing.assert_allclose(heights[:2], [0.9, 0.5])
    assert np.isnan(heights[2])
    assert [t.get_text() for t in ax.get_yticklabels()] == CLASSES
    assert "mIoU 0.700" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"0.900", "0.500", "n/a"} <= {t.get_text() for t in ax.texts}
    figures.to_array(fig)


def test_overlay_figure_has_three_panels_and_a_legend_of_the_classes_present():
    rgb = np.zeros((16, 20, 3), np.uint8)
    truth = np.zeros((16, 20), np.int64)
    truth[4:8] = 1
    pred = np.zeros((16, 20), np.int64)
    pred[:, :3] = 2
    pred[0, 0] = 255  # ignored pixels are not a class
    fig = figures.overlay_figure(rgb, truth, pred, CLASSES, PALETTE, title="k")
    assert [ax.get_title() for ax in fig.axes] == ["image", "ground truth", "prediction"]
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == CLASSES  # road, car (truth), person (prediction)
    np.testing.assert_array_equal(fig.axes[1].images[0].get_array()[5, 0], PALETTE[1])
    figures.to_array(fig)
