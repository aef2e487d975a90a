"""Training losses of the detector: classification BCE, CIoU box loss, DFL, and instance-mask BCE.

References:
    * Jocher et al., ultralytics YOLOv8 ``utils/loss.py`` (``v8DetectionLoss``, ``BboxLoss``,
      ``v8SegmentationLoss``): loss composition, gains (box 7.5, cls 0.5, dfl 1.5) and normalisation
      by the sum of target scores.
    * Feng et al. 2021, TOOD (task-aligned targets, :mod:`training.assigner`).
    * Zheng et al. 2020, Distance-IoU / Complete-IoU loss (:func:`training.box_ops.bbox_ciou`).
    * Li et al. 2020, "Generalized Focal Loss" (Distribution Focal Loss, :func:`dfl_loss`).
    * Bolya et al. 2019, YOLACT (masks as prototypes x coefficients, loss cropped to the box).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from training.assigner import AssignResult, TaskAlignedAssigner
from training.box_ops import bbox2dist, bbox_ciou, dist2bbox
from training.model import Detector, make_anchors


@dataclass(frozen=True)
class TargetBatch:
    """Ground truth of one batch, padded to ``M`` boxes per image.

    Attributes:
        boxes_xyxy: ``(B, M, 4)`` float32 boxes in input pixels.
        class_ids: ``(B, M)`` int64 class ids.
        valid: ``(B, M)`` bool, row is a real box.
        masks: ``(B, M, H/4, W/4)`` uint8 {0,1} instance masks at prototype resolution, or None.
    """

    boxes_xyxy: torch.Tensor
    class_ids: torch.Tensor
    valid: torch.Tensor
    masks: torch.Tensor | None = None

    def __post_init__(self) -> None:
        b, m = self.class_ids.shape
        if self.boxes_xyxy.shape != (b, m, 4) or self.valid.shape != (b, m):
            raise ValueError(
                f"expected boxes (B, M, 4) and valid (B, M) with (B, M)={(b, m)}, "
                f"got {tuple(self.boxes_xyxy.shape)} and {tuple(self.valid.shape)}"
            )
        if self.masks is not None and tuple(self.masks.shape[:2]) != (b, m):
            raise ValueError(f"expected masks (B, M, h, w) with (B, M)={(b, m)}, got {tuple(self.masks.shape)}")


def dfl_loss(pred_dist: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Distribution Focal Loss (Li et al. 2020): cross-entropy to the two bins around the target.

    Args:
        pred_dist: ``(K, 4, reg_max)`` logits.
        target: ``(K, 4)`` distances in bins, in ``[0, reg_max - 1)``.

    Returns:
        ``(K,)`` loss averaged over the four sides.
    """
    reg_max = pred_dist.shape[-1]
    tl = target.long()
    tr = tl + 1
    wl = tr.to(target.dtype) - target
    wr = 1 - wl
    logits = pred_dist.reshape(-1, reg_max)
    ce_l = F.cross_entropy(logits, tl.view(-1), reduction="none").view(tl.shape)
    ce_r = F.cross_entropy(logits, tr.view(-1), reduction="none").view(tl.shape)
    return (ce_l * wl + ce_r * wr).mean(-1)


def crop_mask(masks: torch.Tensor, boxes_xyxy: torch.Tensor) -> torch.Tensor:
    """Zero each mask outside its box (ultralytics ``ops.crop_mask``).

    Args:
        masks: ``(K, h, w)`` maps.
        boxes_xyxy: ``(K, 4)`` boxes in the maps' pixel units.

    Returns:
        ``(K, h, w)`` maps, zero outside ``x1 <= x < x2``, ``y1 <= y < y2`` (pixel index as coordinate).
    """
    _, h, w = masks.shape
    x1, y1, x2, y2 = boxes_xyxy[:, :, None, None].unbind(1)
    c = torch.arange(w, device=masks.device, dtype=boxes_xyxy.dtype)[None, None, :]
    r = torch.arange(h, device=masks.device, dtype=boxes_xyxy.dtype)[None, :, None]
    return masks * ((c >= x1) & (c < x2) & (r >= y1) & (r < y2))


class DetectionLoss:
    """YOLOv8 detection (and optional instance-mask) loss for :class:`training.model.Detector`.

    Args:
        model: the detector (its head configuration is read; it is not stored).
        box_gain: weight of the CIoU loss.
        cls_gain: weight of the classification BCE.
        dfl_gain: weight of the DFL loss.
        mask_gain: weight of the mask loss (segment models).
        assigner: the label assigner (default: TOOD with ultralytics defaults).
    """

    def __init__(
        self,
        *,
        model: Detector,
        box_gain: float = 7.5,
        cls_gain: float = 0.5,
        dfl_gain: float = 1.5,
        mask_gain: float = 7.5,
        assigner: TaskAlignedAssigner | None = None,
    ) -> None:
        self.nc = model.nc
        self.reg_max = model.reg_max
        self.nm = model.nm
        self.strides = model.strides
        self.input_wh = model.config.input_wh
        self.box_gain, self.cls_gain, self.dfl_gain, self.mask_gain = box_gain, cls_gain, dfl_gain, mask_gain
        self.assigner = assigner or TaskAlignedAssigner(num_classes=self.nc, topk=10, alpha=0.5, beta=6.0)

    @property
    def item_names(self) -> tuple[str, ...]:
        """Names of the loss components returned by :meth:`__call__`."""
        return ("box", "cls", "dfl", "mask") if self.nm else ("box", "cls", "dfl")

    def __call__(self, preds: dict[str, object], targets: TargetBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute the loss of one batch.

        Args:
            preds: the detector's training-mode output (``feats``, and ``protos`` for segment models).
            targets: the batch's :class:`TargetBatch` (with ``masks`` for segment models).

        Returns:
            The scalar total loss (mean over images of the weighted sum) and the detached
            per-component losses ``(len(item_names),)``.

        Raises:
            ValueError: if a segment model's targets carry no masks.
        """
        feats = preds["feats"]
        assert isinstance(feats, list)
        b = feats[0].shape[0]
        no = 4 * self.reg_max + self.nc + self.nm
        x = torch.cat([f.view(b, no, -1) for f in feats], 2).transpose(1, 2)  # (B, N, no)
        pred_distri = x[..., : 4 * self.reg_max]
        pred_scores = x[..., 4 * self.reg_max : 4 * self.reg_max + self.nc]
        anchor_points, stride_tensor = make_anchors(feats, self.strides)  # grid units, (N, 1)
        n = anchor_points.shape[0]
        proj = torch.arange(self.reg_max, dtype=x.dtype, device=x.device)
        pred_ltrb = pred_distri.view(b, n, 4, self.reg_max).softmax(3).matmul(proj)
        pred_bboxes = dist2bbox(pred_ltrb, anchor_points)  # (B, N, 4) xyxy grid units

        res = self.assigner(
            pred_scores.detach().sigmoid(),
            (pred_bboxes.detach() * stride_tensor).to(targets.boxes_xyxy.dtype),
            anchor_points * stride_tensor,
            targets.class_ids,
            targets.boxes_xyxy,
            targets.valid,
        )
        target_scores_sum = res.target_scores.sum().clamp(min=1.0)
        loss_cls = F.binary_cross_entropy_with_logits(pred_scores, res.target_scores, reduction="none").sum()
        loss_cls = loss_cls / target_scores_sum
        zero = x.sum() * 0.0
        loss_box, loss_dfl, loss_mask = zero, zero, zero
        fg = res.fg_mask
        if bool(fg.any()):
            weight = res.target_scores.sum(-1)[fg]  # (K,)
            target_grid = res.target_bboxes / stride_tensor  # (B, N, 4) grid units
            iou = bbox_ciou(pred_bboxes[fg], target_grid[fg])
            loss_box = ((1.0 - iou) * weight).sum() / target_scores_sum
            target_ltrb = bbox2dist(anchor_points, target_grid, self.reg_max - 1)
            ldfl = dfl_loss(pred_distri[fg].view(-1, 4, self.reg_max), target_ltrb[fg])
            loss_dfl = (ldfl * weight).sum() / target_scores_sum
        items = [loss_box * self.box_gain, loss_cls * self.cls_gain, loss_dfl * self.dfl_gain]
        if self.nm:
            if targets.masks is None:
                raise ValueError("expected instance masks in the targets of a segment model, got None")
            protos = preds["protos"]
            assert isinstance(protos, torch.Tensor)
            pred_coeffs = x[..., 4 * self.reg_max + self.nc :]
            loss_mask = self._mask_loss(res, targets.masks, pred_coeffs, protos) if bool(fg.any()) else zero
            loss_mask = loss_mask + protos.sum() * 0.0
            items.append(loss_mask * self.mask_gain)
        stacked = torch.stack(items)
        return stacked.sum(), stacked.detach()

    def _mask_loss(
        self, res: AssignResult, gt_masks: torch.Tensor, pred_coeffs: torch.Tensor, protos: torch.Tensor
    ) -> torch.Tensor:
        """Per-positive BCE of ``sigmoid(coeffs @ protos)`` vs the GT mask, cropped to the box, area-normalised.

        Reference: ultralytics ``v8SegmentationLoss.calculate_segmentation_loss``/``single_mask_loss``.
        """
        _, _, mh, mw = protos.shape
        iw, ih = self.input_wh
        scale = torch.tensor([mw / iw, mh / ih, mw / iw, mh / ih], dtype=protos.dtype, device=protos.device)
        norm = torch.tensor([1 / iw, 1 / ih, 1 / iw, 1 / ih], dtype=protos.dtype, device=protos.device)
        total = protos.sum() * 0.0
        for i in range(protos.shape[0]):
            fg_i = res.fg_mask[i]
            if not bool(fg_i.any()):
                continue
            idx = res.target_gt_idx[i][fg_i]
            gt = gt_masks[i][idx].to(protos.dtype)  # (K, mh, mw)
            boxes = res.target_bboxes[i][fg_i]
            bn = boxes * norm
            area = ((bn[:, 2] - bn[:, 0]) * (bn[:, 3] - bn[:, 1])).clamp(min=1e-6)
            logits = torch.einsum("kc,chw->khw", pred_coeffs[i][fg_i], protos[i])
            bce = F.binary_cross_entropy_with_logits(logits, gt, reduction="none")
            total = total + (crop_mask(bce, boxes * scale).mean(dim=(1, 2)) / area).sum()
        return total / res.fg_mask.sum().clamp(min=1)
