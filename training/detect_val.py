"""Validation of the detector during training: mean loss and box mAP (pycocotools) on the held-out cache."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from training.loss import DetectionLoss
from training.model import Detector
from training.traindata import BatchLoader, DetectionCache


@dataclass(frozen=True)
class ValResult:
    """Validation figures of one epoch.

    Attributes:
        losses: mean loss components by name.
        map50: box mAP@0.5 (input pixels, pycocotools).
        map50_95: box mAP@[.5:.95].
    """

    losses: dict[str, float]
    map50: float
    map50_95: float

    @property
    def fitness(self) -> float:
        """``0.1 mAP50 + 0.9 mAP50-95`` (ultralytics fitness)."""
        return 0.1 * self.map50 + 0.9 * self.map50_95


def coco_ground_truth(cache: DetectionCache, class_names: Sequence[str]) -> dict[str, Any]:
    """COCO ground truth of a cache's boxes, in input pixels (ignored objects as crowd).

    Returns:
        A COCO dict: ``images`` (id = cache index), ``annotations`` (``bbox`` xywh,
        ``category_id`` = class id + 1, ``iscrowd``), ``categories``.
    """
    w, h = cache.spec.input_wh
    images = [{"id": i, "width": w, "height": h, "file_name": f"{i:06d}"} for i in range(len(cache))]
    anns: list[dict[str, Any]] = []
    for i in range(len(cache)):
        boxes, classes, _ = cache.objects(i)
        ign = cache.ignore[int(cache.offsets[i]) : int(cache.offsets[i + 1])]
        for b, c, g in zip(boxes.tolist(), classes.tolist(), ign.tolist(), strict=True):
            bw, bh = b[2] - b[0], b[3] - b[1]
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(c) + 1,
                         "bbox": [b[0], b[1], bw, bh], "area": bw * bh, "iscrowd": int(g)})
    cats = [{"id": k + 1, "name": n} for k, n in enumerate(class_names)]
    return {"images": images, "annotations": anns, "categories": cats}


@torch.no_grad()
def validate(
    model: Detector, loss_fn: DetectionLoss, loader: BatchLoader, gt_coco: dict[str, Any], max_batches: int = 0
) -> ValResult:
    """Mean validation loss and box mAP of ``model`` (eval mode) on ``loader``'s images.

    Detections are decoded with the pipeline's :func:`streamdet.postprocess.decode_ultralytics_detect`
    at the mAP settings :data:`streamdet.postprocess.EVAL_CONFIG` and scored by
    :func:`training.evaluate.evaluate_coco`, all in input pixels.

    Args:
        model: the (EMA) detector.
        loss_fn: the training loss.
        loader: unshuffled, unaugmented batches of the validation cache.
        gt_coco: :func:`coco_ground_truth` of that cache.
        max_batches: validate on at most this many batches (0: all).

    Returns:
        The :class:`ValResult`.
    """
    from streamdet.postprocess import EVAL_CONFIG, decode_ultralytics_detect
    from training.evaluate import evaluate_coco

    was_training = model.training
    model.eval()
    totals = torch.zeros(len(loss_fn.item_names))
    count = 0
    dets: list[dict[str, Any]] = []
    seen: set[int] = set()
    for bi, batch in enumerate(loader.epoch(0)):
        if max_batches and bi >= max_batches:
            break
        raw = model.forward_raw(batch.images)
        _, items = loss_fn(raw, batch.targets)
        totals += items
        count += 1
        out0 = model.decode(raw["feats"]).numpy()
        cands = decode_ultralytics_detect(out0, num_classes=model.nc, cfg=EVAL_CONFIG)
        for idx, c in zip(batch.indices.tolist(), cands, strict=True):
            seen.add(int(idx))
            for b, s, k in zip(c.boxes_xyxy.tolist(), c.scores.tolist(), c.class_ids.tolist(), strict=True):
                dets.append({"image_id": int(idx), "category_id": int(k) + 1, "score": float(s),
                             "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]})
    model.train(was_training)
    gt = dict(gt_coco)
    gt["images"] = [im for im in gt_coco["images"] if im["id"] in seen]
    gt["annotations"] = [a for a in gt_coco["annotations"] if a["image_id"] in seen]
    metrics = evaluate_coco(gt, dets, "bbox")
    losses = {n: float(v) / max(1, count) for n, v in zip(loss_fn.item_names, totals.tolist(), strict=True)}
    return ValResult(losses=losses, map50=float(metrics["mAP50"] or 0.0), map50_95=float(metrics["mAP50-95"] or 0.0))
