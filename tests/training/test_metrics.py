"""The shared semantic metrics: confusion matrix (with its ignore rules), per-class IoU and mIoU; the run log."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from training.metrics import confusion_matrix, iou_per_class, mean_iou, pixel_accuracy
from training.runlog import RunLog


def test_confusion_counts_and_ignore_index() -> None:
    gt = np.array([[0, 1, 1], [2, 255, 3]])
    pred = np.array([[0, 1, 0], [2, 2, 1]])
    cm = confusion_matrix(pred, gt, 3, ignore_index=3)  # evaluate's rule: ids >= C are void
    assert cm.sum() == 4 and cm[1, 0] == 1 and cm[1, 1] == 1
    valid = np.array([[True, False, True], [True, True, False]])
    cm_valid = confusion_matrix(pred, np.minimum(gt, 2), 3, valid)
    assert cm_valid.sum() == valid.sum()
    with pytest.raises(ValueError, match="predicted class ids < 3"):
        confusion_matrix(np.full_like(gt, 3), np.zeros_like(gt), 3)
    with pytest.raises(ValueError, match="equal shapes"):
        confusion_matrix(pred, gt[:1], 3)


def test_iou_and_mean_iou() -> None:
    cm = np.array([[2, 1, 0], [0, 3, 0], [0, 0, 0]])
    iou = iou_per_class(cm)
    np.testing.assert_allclose(iou[:2], [2 / 3, 3 / 4])
    assert math.isnan(iou[2])  # in neither prediction nor ground truth
    assert mean_iou(cm) == pytest.approx((2 / 3 + 3 / 4) / 2)
    assert math.isnan(mean_iou(np.zeros((3, 3), np.int64)))
    assert pixel_accuracy(cm) == pytest.approx(5 / 6) and pixel_accuracy(np.zeros((2, 2))) == 0.0


def test_run_log_header_and_resume(tmp_path: Path) -> None:
    log = RunLog(tmp_path, ["train_loss", "val_mIoU"], resume=False)
    log.write(epoch=1, iterations=5, lr=1e-3, values={"train_loss": 0.5, "val_mIoU": 0.25}, images_per_s=3.0,
              epoch_s=1.25)
    RunLog(tmp_path, ["train_loss", "val_mIoU"], resume=True).write(
        epoch=2, iterations=10, lr=2e-4, values={"train_loss": 0.4, "val_mIoU": 0.5}, images_per_s=3.0, epoch_s=1.0)
    rows = list(csv.reader((tmp_path / "log.csv").open()))
    assert rows[0] == ["epoch", "iterations", "lr", "train_loss", "val_mIoU", "images_per_s", "epoch_s"]
    assert rows[1] == ["1", "5", "0.001", "0.50000", "0.25000", "3.00", "1.2"]
    assert [r[0] for r in rows[1:]] == ["1", "2"]
    RunLog(tmp_path, ["x"], resume=False)
    assert (tmp_path / "log.csv").read_text().splitlines() == ["epoch,iterations,lr,x,images_per_s,epoch_s"]
