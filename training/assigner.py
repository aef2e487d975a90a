"""Task-aligned label assignment for the anchor-free detector.

Reference: Feng et al. 2021, "TOOD: Task-aligned One-stage Object Detection" (ICCV), arXiv:2108.07755,
and its YOLOv8 form, ultralytics ``utils/tal.py`` ``TaskAlignedAssigner`` (Jocher et al.), whose
defaults (``topk=10``, ``alpha=0.5``, ``beta=6.0``) are used here.

For every ground-truth box the alignment metric ``t = s^alpha * u^beta`` (``s``: the predicted
score of the box's class, ``u``: CIoU of the predicted box with the ground truth) is computed at
the anchor points whose centres lie inside the box; the ``topk`` anchors with the largest ``t``
become positives. An anchor claimed by several boxes keeps the one with the highest IoU. Targets
are one-hot class vectors scaled by ``t`` normalised so that, per box, the best anchor's target
equals that box's best IoU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from training.box_ops import bbox_ciou


@dataclass(frozen=True)
class AssignResult:
    """Targets of one batch, per anchor.

    Attributes:
        target_labels: ``(B, N)`` int64 class id of the assigned box (0 where unassigned).
        target_bboxes: ``(B, N, 4)`` float32 xyxy assigned box, input pixels.
        target_scores: ``(B, N, C)`` float32 soft class targets (normalised alignment metric).
        fg_mask: ``(B, N)`` bool, anchor is a positive.
        target_gt_idx: ``(B, N)`` int64 index of the assigned ground truth in its image.
    """

    target_labels: torch.Tensor
    target_bboxes: torch.Tensor
    target_scores: torch.Tensor
    fg_mask: torch.Tensor
    target_gt_idx: torch.Tensor


class TaskAlignedAssigner:
    """TOOD task-aligned assigner (ultralytics ``TaskAlignedAssigner``).

    Args:
        num_classes: number of classes ``C``.
        topk: positives per ground-truth box (before conflict resolution).
        alpha: exponent of the classification score in the alignment metric.
        beta: exponent of the IoU in the alignment metric.
        eps: numerical guard.
    """

    def __init__(
        self, *, num_classes: int, topk: int = 10, alpha: float = 0.5, beta: float = 6.0, eps: float = 1e-9
    ) -> None:
        if num_classes <= 0 or topk <= 0:
            raise ValueError(f"expected num_classes > 0 and topk > 0, got {num_classes} and {topk}")
        self.num_classes = num_classes
        self.topk = topk
        self.alpha = alpha
        self.beta = beta
        self.eps = eps

    @torch.no_grad()
    def __call__(
        self,
        pd_scores: torch.Tensor,
        pd_bboxes: torch.Tensor,
        anc_points: torch.Tensor,
        gt_labels: torch.Tensor,
        gt_bboxes: torch.Tensor,
        mask_gt: torch.Tensor,
    ) -> AssignResult:
        """Assign ground truth to anchors.

        Args:
            pd_scores: ``(B, N, C)`` predicted class probabilities (after sigmoid).
            pd_bboxes: ``(B, N, 4)`` predicted xyxy boxes, input pixels.
            anc_points: ``(N, 2)`` anchor centres ``(x, y)``, input pixels.
            gt_labels: ``(B, M)`` int64 class ids (padding rows arbitrary).
            gt_bboxes: ``(B, M, 4)`` xyxy ground-truth boxes, input pixels.
            mask_gt: ``(B, M)`` bool, row is a real box (not padding).

        Returns:
            The :class:`AssignResult`.
        """
        b, n, c = pd_scores.shape
        m = gt_bboxes.shape[1]
        device = pd_scores.device
        if m == 0:
            return AssignResult(
                target_labels=torch.zeros(b, n, dtype=torch.long, device=device),
                target_bboxes=torch.zeros(b, n, 4, device=device),
                target_scores=torch.zeros(b, n, c, device=device),
                fg_mask=torch.zeros(b, n, dtype=torch.bool, device=device),
                target_gt_idx=torch.zeros(b, n, dtype=torch.long, device=device),
            )
        mask_gt_f = mask_gt.to(pd_scores.dtype).unsqueeze(-1)  # (B, M, 1)
        mask_in_gts = anchors_in_boxes(anc_points, gt_bboxes, self.eps)  # (B, M, N)
        align_metric, overlaps = self._box_metrics(pd_scores, pd_bboxes, gt_labels, gt_bboxes,
                                                   mask_in_gts * mask_gt_f)
        mask_topk = self._topk_mask(align_metric, mask_gt)  # (B, M, N)
        mask_pos = mask_topk * mask_in_gts * mask_gt_f
        target_gt_idx, fg_mask, mask_pos = resolve_multiple_assignments(mask_pos, overlaps)
        # targets
        batch_ind = torch.arange(b, device=device).unsqueeze(-1)
        flat_idx = target_gt_idx + batch_ind * m  # (B, N)
        target_labels = gt_labels.long().flatten()[flat_idx].clamp_(0, c - 1)
        target_bboxes = gt_bboxes.view(-1, 4)[flat_idx]
        target_scores = torch.nn.functional.one_hot(target_labels, c).to(pd_scores.dtype)
        target_scores = torch.where(fg_mask.unsqueeze(-1), target_scores, torch.zeros_like(target_scores))
        # normalise the alignment metric per box: best anchor's target = that box's best IoU
        align_metric = align_metric * mask_pos
        pos_align = align_metric.amax(dim=-1, keepdim=True)  # (B, M, 1)
        pos_overlaps = (overlaps * mask_pos).amax(dim=-1, keepdim=True)
        norm_align = (align_metric * pos_overlaps / (pos_align + self.eps)).amax(-2).unsqueeze(-1)  # (B, N, 1)
        target_scores = target_scores * norm_align
        return AssignResult(target_labels, target_bboxes, target_scores, fg_mask, target_gt_idx)

    def _box_metrics(
        self,
        pd_scores: torch.Tensor,
        pd_bboxes: torch.Tensor,
        gt_labels: torch.Tensor,
        gt_bboxes: torch.Tensor,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Alignment metric and CIoU, ``(B, M, N)`` each, zero outside ``mask``."""
        b, n, _ = pd_scores.shape
        m = gt_bboxes.shape[1]
        mask_b = mask.bool()
        overlaps = torch.zeros(b, m, n, dtype=pd_bboxes.dtype, device=pd_bboxes.device)
        bbox_scores = torch.zeros(b, m, n, dtype=pd_scores.dtype, device=pd_scores.device)
        labels = gt_labels.long().clamp(0, self.num_classes - 1)
        # (B, M, N): score of each box's class at each anchor
        scores_bmn = pd_scores.gather(2, labels.unsqueeze(1).expand(b, n, m)).transpose(1, 2)
        bbox_scores[mask_b] = scores_bmn[mask_b]
        pd = pd_bboxes.unsqueeze(1).expand(b, m, n, 4)[mask_b]
        gt = gt_bboxes.unsqueeze(2).expand(b, m, n, 4)[mask_b]
        overlaps[mask_b] = bbox_ciou(gt, pd).clamp_(0)
        align_metric = bbox_scores.pow(self.alpha) * overlaps.pow(self.beta)
        return align_metric, overlaps

    def _topk_mask(self, metrics: torch.Tensor, mask_gt: torch.Tensor) -> torch.Tensor:
        """``(B, M, N)`` float mask of each real box's ``topk`` anchors by ``metrics``."""
        n = metrics.shape[-1]
        k = min(self.topk, n)
        _, idx = torch.topk(metrics, k, dim=-1, largest=True)  # (B, M, k)
        out = torch.zeros_like(metrics)
        out.scatter_(-1, idx, 1.0)
        return out * mask_gt.to(metrics.dtype).unsqueeze(-1)


def anchors_in_boxes(anc_points: torch.Tensor, gt_bboxes: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """Which anchor centres lie strictly inside which boxes.

    Args:
        anc_points: ``(N, 2)`` anchor centres ``(x, y)``.
        gt_bboxes: ``(B, M, 4)`` xyxy boxes in the same units.
        eps: margin: a centre must be more than ``eps`` inside every side.

    Returns:
        ``(B, M, N)`` float32 mask (1.0 inside).
    """
    b, m, _ = gt_bboxes.shape
    lt, rb = gt_bboxes.view(-1, 1, 4).chunk(2, 2)  # (BM, 1, 2)
    deltas = torch.cat((anc_points.unsqueeze(0) - lt, rb - anc_points.unsqueeze(0)), dim=2)  # (BM, N, 4)
    return (deltas.amin(2) > eps).view(b, m, -1).to(gt_bboxes.dtype)


def resolve_multiple_assignments(
    mask_pos: torch.Tensor, overlaps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep, for an anchor claimed by several boxes, only the box with the highest IoU.

    Args:
        mask_pos: ``(B, M, N)`` float candidate mask.
        overlaps: ``(B, M, N)`` IoU of each box with each anchor's prediction.

    Returns:
        ``target_gt_idx`` ``(B, N)`` int64, ``fg_mask`` ``(B, N)`` bool, and the resolved ``mask_pos``.
    """
    fg = mask_pos.sum(-2)  # (B, N)
    if bool((fg > 1).any()):
        multi = (fg.unsqueeze(1) > 1).expand_as(mask_pos)
        best = overlaps.argmax(1)  # (B, N)
        is_best = torch.zeros_like(mask_pos)
        is_best.scatter_(1, best.unsqueeze(1), 1.0)
        mask_pos = torch.where(multi, is_best, mask_pos)
        fg = mask_pos.sum(-2)
    target_gt_idx = mask_pos.argmax(-2)
    return target_gt_idx, fg > 0, mask_pos
