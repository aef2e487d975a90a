"""COCO scoring with pycocotools: results and ground truth in, mAP metrics (and precision-recall plots) out.

References: T.-Y. Lin et al., "Microsoft COCO: Common Objects in Context", ECCV 2014, and the
``pycocotools`` ``COCOeval`` implementation (101-point interpolated AP, IoU .50:.05:.95).
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Any

import numpy.typing as npt
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from streamdet.postprocess import Detections
from training.cli_common import remove_leftovers


class IouType(str, Enum):
    """What COCOeval compares."""

    BBOX = "bbox"
    SEGM = "segm"



def round_result(v: float, nd: int) -> float:
    """``v`` as a Python float rounded to ``nd`` decimals (COCO result files; numpy scalars accepted)."""
    return float(round(float(v), nd))


def _normalized_gt(gt: Mapping[str, Any], iou_type: IouType) -> dict[str, Any]:
    """A copy of a COCO ground-truth dict that pycocotools can evaluate.

    Annotation ids are renumbered from 1 (COCOeval treats a matched ground-truth id of 0 as "no
    match"), ``iscrowd`` defaults to 0 and ``area`` to the box area.
    """
    for key in ("images", "annotations", "categories"):
        if not isinstance(gt.get(key), list):
            raise ValueError(f"expected a list under '{key}' in the ground truth")
    anns = []
    for i, a in enumerate(gt["annotations"]):
        b = a.get("bbox")
        if not (isinstance(b, (list, tuple)) and len(b) == 4):
            raise ValueError(f"expected annotation bbox [x, y, w, h], got {str(b)[:80]}")
        if iou_type is IouType.SEGM and "segmentation" not in a:
            raise ValueError(f"expected a segmentation in every annotation for segm evaluation, annotation "
                             f"{a.get('id', i)} has none")
        anns.append({**a, "id": i + 1, "iscrowd": int(a.get("iscrowd", 0)),
                     "area": float(a.get("area", float(b[2]) * float(b[3])))})
    out = {k: v for k, v in gt.items() if k != "annotations"}
    out["annotations"] = anns
    return out


def _clean_results(dets: Sequence[Mapping[str, Any]], iou_type: IouType, image_ids: set[int]) -> list[dict[str, Any]]:
    """Validated copies of detection results with only the keys of ``iou_type``.

    pycocotools' ``loadRes`` picks its branch (and the area it computes) from the first result's keys.
    """
    key = "bbox" if iou_type is IouType.BBOX else "segmentation"
    out = []
    for d in dets:
        if not all(k in d for k in ("image_id", "category_id", "score", key)):
            raise ValueError(f"expected detection with image_id, category_id, score and {key}, got "
                             f"{sorted(d)}")
        if d["image_id"] not in image_ids:
            raise ValueError(f"expected detections on ground-truth images only, got image_id {d['image_id']}")
        out.append({"image_id": d["image_id"], "category_id": d["category_id"], "score": float(d["score"]),
                    key: list(d[key]) if key == "bbox" else dict(d[key])})
    return out


def run_cocoeval(
    gt_coco: Mapping[str, Any], detections: Sequence[Mapping[str, Any]], iou_type: IouType | str
) -> COCOeval | None:
    """Run pycocotools' COCOeval (evaluate + accumulate), quietly.

    Args:
        gt_coco: COCO ground truth (``images``, ``annotations``, ``categories``).
        detections: COCO results: dicts with ``image_id``, ``category_id``, ``score`` and ``bbox``
            ``[x, y, w, h]`` (frame pixels) or ``segmentation`` (RLE).
        iou_type: :class:`IouType`.

    Returns:
        The accumulated ``COCOeval``, or ``None`` when there are no detections.

    Raises:
        ValueError: on malformed ground truth or results, or results on unknown images.
    """
    it = IouType(iou_type)
    gt = _normalized_gt(gt_coco, it)
    image_ids = {im["id"] for im in gt["images"]}
    res = _clean_results(detections, it, image_ids)
    if not res:
        return None
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(res)
        ev = COCOeval(coco_gt, coco_dt, iouType=it.value)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def _stat(v: float) -> float | None:
    return None if v < 0 else float(v)


def _mean_valid(p: npt.NDArray[Any]) -> float | None:
    v = p[p > -1]
    return float(v.mean()) if v.size else None


def summarize_cocoeval(ev: COCOeval | None, gt_coco: Mapping[str, Any], iou_type: IouType | str) -> dict[str, Any]:
    """Metrics of an accumulated COCOeval as a JSON-ready dict.

    Args:
        ev: from :func:`run_cocoeval` (``None``: no detections, every AP is 0 where ground truth exists).
        gt_coco: the ground truth (for category names and whether any ground truth exists).
        iou_type: :class:`IouType`.

    Returns:
        ``{"iou_type", "mAP50-95", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large",
        "AR100", "per_class": {name: {"AP50-95", "AP50"}}}``; a value is ``None`` where it is
        undefined (no ground truth), AP values are in ``[0, 1]``. Per-class AP is the mean of the
        COCOeval precision array over IoU thresholds and recall points, area "all", 100 detections.
    """
    it = IouType(iou_type)
    cats = sorted(gt_coco["categories"], key=lambda c: c["id"])
    keys = ("mAP50-95", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large")
    out: dict[str, Any] = {"iou_type": it.value}
    if ev is None:
        counted = {a["category_id"] for a in gt_coco["annotations"] if not a.get("iscrowd", 0)}
        zero = 0.0 if counted else None
        out.update({k: zero for k in keys})
        out["AR100"] = zero
        out["per_class"] = {c["name"]: {"AP50-95": 0.0 if c["id"] in counted else None,
                                        "AP50": 0.0 if c["id"] in counted else None} for c in cats}
        return out
    stats = ev.stats
    for k, v in zip(keys, stats[:6], strict=True):
        out[k] = _stat(v)
    out["AR100"] = _stat(stats[8])
    prec = ev.eval["precision"]  # (T, R, K, A, M)
    by_id = {c["id"]: c["name"] for c in cats}
    per_class = {}
    for j, cat_id in enumerate(ev.params.catIds):
        per_class[by_id.get(cat_id, str(cat_id))] = {"AP50-95": _mean_valid(prec[:, :, j, 0, -1]),
                                                     "AP50": _mean_valid(prec[0, :, j, 0, -1])}
    out["per_class"] = per_class
    return out


def evaluate_coco(
    gt_coco_dict: Mapping[str, Any], detections_json_list: Sequence[Mapping[str, Any]], iou_type: IouType | str
) -> dict[str, Any]:
    """Score COCO results against COCO ground truth with pycocotools.

    Args:
        gt_coco_dict: COCO ground truth (``images``, ``annotations``, ``categories``); boxes and masks
            in frame pixels.
        detections_json_list: COCO results (``image_id``, ``category_id``, ``score``, and ``bbox``
            ``[x, y, w, h]`` or ``segmentation`` RLE).
        iou_type: ``"bbox"`` or ``"segm"`` (:class:`IouType`).

    Returns:
        The metrics dict of :func:`summarize_cocoeval` (``mAP50-95``, ``mAP50``, ..., ``per_class``).

    Raises:
        ValueError: on malformed ground truth or results.
    """
    ev = run_cocoeval(gt_coco_dict, detections_json_list, iou_type)
    return summarize_cocoeval(ev, gt_coco_dict, iou_type)


def detections_to_coco(dets: Detections, image_id: int, category_ids: Sequence[int]) -> list[dict[str, Any]]:
    """COCO bbox results of one image.

    Args:
        dets: the image's detections (frame pixels).
        image_id: its COCO image id.
        category_ids: COCO category id of each class id.

    Returns:
        Dicts with ``image_id``, ``category_id``, ``bbox`` ``[x, y, w, h]`` and ``score``.
    """
    b = dets.boxes_xyxy
    out = []
    for (x1, y1, x2, y2), s, c in zip(b.tolist(), dets.scores.tolist(), dets.class_ids.tolist(), strict=True):
        out.append({"image_id": image_id, "category_id": int(category_ids[c]),
                    "bbox": [round_result(v, 3) for v in (x1, y1, x2 - x1, y2 - y1)],
                    "score": round_result(s, 5)})
    return out


def plot_pr_curves(evals: Mapping[str, COCOeval | None], path: str | os.PathLike[str]) -> None:
    """Save precision-recall curves (class-averaged, IoU 0.50 and 0.75, area all, 100 detections).

    Args:
        evals: label (e.g. ``"box"``, ``"mask"``) -> accumulated COCOeval (``None`` entries are skipped).
        path: output image (PNG); written to a temporary name, then renamed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5), dpi=100)
    styles = {0: "-", 5: "--"}
    for label, ev in evals.items():
        if ev is None:
            continue
        prec = ev.eval["precision"]
        recall = ev.params.recThrs
        for t, style in styles.items():
            p = prec[t, :, :, 0, -1]  # (R, K)
            valid = (p > -1).any(axis=0)
            if not valid.any():
                continue
            curve = p[:, valid].clip(min=0).mean(axis=1)
            iou = ev.params.iouThrs[t]
            ax.plot(recall, curve, style, label=f"{label} IoU={iou:.2f} AP={curve.mean():.3f}")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left")
    ax.set_title("precision-recall (mean over classes)")
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    fmt = p.suffix.lstrip(".").lower() or "png"
    try:
        fig.savefig(tmp, format=fmt, bbox_inches="tight")
        os.replace(tmp, p)
    finally:
        plt.close(fig)
        remove_leftovers(tmp)
