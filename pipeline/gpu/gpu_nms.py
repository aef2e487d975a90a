"""Batched, class-aware greedy NMS and the detect-head postprocess in torch, on the GPU.

Greedy hard NMS is sequential by definition (a box is kept when no *kept* higher-scored box
overlaps it more than the threshold), which maps badly onto a GPU as a loop over boxes. Here it is
computed as a fixed point instead (Cluster-NMS, Zheng et al. 2021): with the score-sorted upper
triangular "overlaps too much" matrix ``O`` (``O[j, i]`` for ``j < i``), iterate
``keep[i] = not any_j (keep[j] and O[j, i])`` from ``keep = all``. After ``t`` iterations the first
``t`` entries equal greedy NMS (each entry depends only on earlier ones), and a fixed point is the
greedy result (the recursion has one solution), so the loop stops at the first iteration that
changes nothing: the number of iterations is the length of the longest suppression chain, not
the number of boxes. Each iteration is one batched matrix-vector product for all images.

Semantics match :mod:`streamdet.nms` exactly: IoU strictly greater than the threshold suppresses,
score ties go to the lower index (stable sort), zero-area pairs have IoU 0, and boxes of different
classes never suppress each other (compared by class id, not by torchvision's coordinate-offset
trick, which can flip decisions at the threshold). IoU uses the same float32 operations in the
same order as :func:`streamdet.boxes.box_iou`.

:func:`postprocess_detect_torch` is the device twin of :func:`streamdet.postprocess.postprocess_detect`
for ``ultralytics_detect`` heads with hard NMS: score threshold, best class, ``pre_nms_topk``,
NMS, ``max_detections``, the letterbox undone and clipped, all on the device; only the kept
detections (``(B, max_detections, 6)`` at most) are copied to the host.

References: Z. Zheng et al., "Enhancing Geometric Factors in Model Learning and Inference for
Object Detection and Instance Segmentation", IEEE TCYB 2021 (Cluster-NMS); torchvision
``ops/boxes.py`` (``batched_nms``); ultralytics ``utils/ops.py`` (``non_max_suppression``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from streamdet.letterbox import LetterboxParams
from streamdet.postprocess import Detections, NmsMethod, PostprocessConfig, unpack_detections

if TYPE_CHECKING:
    import torch

IOU_BLOCK_ELEMENTS = 1 << 26
"""Most IoU values (``images x K x K``) computed at once; bounds the memory of one NMS chunk (256 MiB)."""


def box_area_torch(boxes_xyxy: torch.Tensor) -> torch.Tensor:
    """Area of ``(..., 4)`` float32 xyxy boxes; degenerate boxes count as zero (as :func:`streamdet.boxes.box_area`)."""
    wh = (boxes_xyxy[..., 2:4] - boxes_xyxy[..., 0:2]).clamp(min=0.0)
    return wh[..., 0] * wh[..., 1]


def box_iou_torch(boxes1_xyxy: torch.Tensor, boxes2_xyxy: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU, batched: ``(..., N, 4)`` x ``(..., M, 4)`` -> ``(..., N, M)`` float32.

    Same float32 arithmetic as :func:`streamdet.boxes.box_iou`; pairs with zero union have IoU 0.
    """
    import torch

    a1 = box_area_torch(boxes1_xyxy)
    a2 = box_area_torch(boxes2_xyxy)
    lt = torch.maximum(boxes1_xyxy[..., :, None, 0:2], boxes2_xyxy[..., None, :, 0:2])
    rb = torch.minimum(boxes1_xyxy[..., :, None, 2:4], boxes2_xyxy[..., None, :, 2:4])
    wh = (rb - lt).clamp(min=0.0)
    inter = wh[..., 0] * wh[..., 1]
    union = a1[..., :, None] + a2[..., None, :] - inter
    return torch.where(union > 0, inter / union, torch.zeros_like(inter))


def _cluster_keep(over: torch.Tensor) -> torch.Tensor:
    """Greedy-NMS keep mask ``(..., K)`` from an upper-triangular overlap mask ``(..., K, K)`` (fixed point)."""
    import torch

    k = over.shape[-1]
    keep = torch.ones(over.shape[:-1], dtype=torch.bool, device=over.device)
    overf = over.to(torch.float32)
    for _ in range(k + 1):
        suppressed = torch.matmul(keep.to(torch.float32).unsqueeze(-2), overf).squeeze(-2) > 0
        new_keep = ~suppressed
        if torch.equal(new_keep, keep):
            break
        keep = new_keep
    return keep


def batched_nms_sorted_torch(
    boxes_xyxy: torch.Tensor,
    class_ids: torch.Tensor,
    valid: torch.Tensor,
    iou_threshold: float,
    *,
    class_agnostic: bool = False,
) -> torch.Tensor:
    """Greedy hard NMS of several images at once, candidates already sorted by descending score.

    Args:
        boxes_xyxy: ``(B, K, 4)`` float32 xyxy boxes, each image's rows by descending score (ties by index).
        class_ids: ``(B, K)`` integer class ids.
        valid: ``(B, K)`` bool; invalid rows (padding) neither suppress nor are kept.
        iou_threshold: IoU strictly above this suppresses.
        class_agnostic: let boxes of different classes suppress each other.

    Returns:
        ``(B, K)`` bool keep mask.
    """
    import torch

    b, k = boxes_xyxy.shape[0], boxes_xyxy.shape[1]
    keep = torch.zeros((b, k), dtype=torch.bool, device=boxes_xyxy.device)
    if b == 0 or k == 0:
        return keep
    step = max(1, IOU_BLOCK_ELEMENTS // (k * k))
    upper = torch.ones((k, k), dtype=torch.bool, device=boxes_xyxy.device).triu_(1)
    for s in range(0, b, step):
        bx, cl, va = boxes_xyxy[s : s + step], class_ids[s : s + step], valid[s : s + step]
        over = (box_iou_torch(bx, bx) > iou_threshold) & upper
        if not class_agnostic:
            over &= cl[:, :, None] == cl[:, None, :]
        over &= va[:, :, None] & va[:, None, :]
        keep[s : s + step] = _cluster_keep(over) & va
    return keep


def batched_nms_torch(
    boxes_xyxy: torch.Tensor,
    scores: torch.Tensor,
    class_ids: torch.Tensor,
    iou_threshold: float,
    *,
    class_agnostic: bool = False,
    max_output: int | None = None,
) -> torch.Tensor:
    """Class-aware greedy hard NMS of one image (same result as :func:`streamdet.nms.batched_nms`).

    Args:
        boxes_xyxy: ``(N, 4)`` float32 xyxy boxes.
        scores: ``(N,)`` float32 scores.
        class_ids: ``(N,)`` integer class ids.
        iou_threshold: IoU strictly above this suppresses.
        class_agnostic: ignore ``class_ids``.
        max_output: keep at most this many (the highest-scored).

    Returns:
        ``(K,)`` int64 indices of the kept boxes, by descending score (ties by index).

    Raises:
        ValueError: on mismatched shapes.
    """
    import torch

    n = boxes_xyxy.shape[0]
    if boxes_xyxy.ndim != 2 or boxes_xyxy.shape[1] != 4 or scores.shape != (n,) or class_ids.shape != (n,):
        raise ValueError(f"expected boxes (N, 4), scores (N,), class_ids (N,), got {tuple(boxes_xyxy.shape)}, "
                         f"{tuple(scores.shape)}, {tuple(class_ids.shape)}")
    order = torch.sort(scores, descending=True, stable=True).indices
    keep = batched_nms_sorted_torch(boxes_xyxy[order][None], class_ids[order][None],
                                    torch.ones((1, n), dtype=torch.bool, device=boxes_xyxy.device),
                                    iou_threshold, class_agnostic=class_agnostic)[0]
    kept = order[keep]
    return kept[:max_output] if max_output is not None else kept


def postprocess_detect_torch(
    output0: torch.Tensor,
    letterboxes: Sequence[LetterboxParams],
    *,
    num_classes: int,
    cfg: PostprocessConfig,
) -> list[Detections]:
    """Detections of a batch from an ``ultralytics_detect`` head, computed on the output's device.

    Args:
        output0: ``(B, 4 + C [+ extra], N)`` raw output (boxes cxcywh in input pixels, sigmoid scores).
        letterboxes: one :class:`~streamdet.letterbox.LetterboxParams` per image.
        num_classes: ``C``.
        cfg: :class:`~streamdet.postprocess.PostprocessConfig`; hard NMS, single label only.

    Returns:
        One :class:`~streamdet.postprocess.Detections` per image (host numpy), boxes in frame pixels,
        by descending score; equal to :func:`streamdet.postprocess.postprocess_detect`.

    Raises:
        ValueError: on a bad output shape, a letterbox count that differs from ``B``, Soft-NMS or
            ``multi_label`` (use the CPU postprocess for those).
    """
    import torch

    if output0.ndim != 3 or output0.shape[1] < 4 + num_classes:
        raise ValueError(f"expected output0 of shape (B, {4 + num_classes}+, N), got {tuple(output0.shape)}")
    bsz, _, n = output0.shape
    if len(letterboxes) != bsz:
        raise ValueError(f"expected one letterbox per image ({bsz}), got {len(letterboxes)}")
    if cfg.nms_method is not NmsMethod.HARD or cfg.multi_label:
        raise ValueError(f"expected hard NMS without multi_label on the GPU, got {cfg.nms_method.value}"
                         f"{' multi_label' if cfg.multi_label else ''} (use streamdet.postprocess)")
    dev = output0.device
    out = output0.float()
    cls_scores = out[:, 4 : 4 + num_classes]  # (B, C, N)
    best, best_cls = cls_scores.max(dim=1)  # (B, N): first max on ties, as numpy argmax
    cand = (best > cfg.score_threshold) & torch.isfinite(best) & torch.isfinite(out[:, 0:4]).all(dim=1)  # (no NaN)
    counts = cand.sum(dim=1)
    k = min(int(counts.max().item()) if bsz else 0, cfg.pre_nms_topk)
    if k == 0:
        return [Detections.empty() for _ in range(bsz)]
    masked = torch.where(cand, best, torch.full_like(best, -1.0))
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices[:, :k]  # (B, K) anchors
    valid = torch.arange(k, device=dev)[None, :] < counts[:, None]
    scores = torch.gather(best, 1, order)
    classes = torch.gather(best_cls, 1, order)
    boxes_c = torch.gather(out[:, 0:4], 2, order[:, None, :].expand(bsz, 4, k)).transpose(1, 2)  # (B, K, 4)
    half = boxes_c[..., 2:4] * 0.5
    boxes = torch.cat((boxes_c[..., 0:2] - half, boxes_c[..., 0:2] + half), dim=2)
    keep = batched_nms_sorted_torch(boxes, classes, valid, cfg.iou_threshold, class_agnostic=cfg.class_agnostic)
    keep &= torch.cumsum(keep.to(torch.int32), dim=1) <= cfg.max_detections
    # undo the letterbox on the device: (b - pad) / scale, clipped to the frame
    pads = torch.tensor([[*lb.pad_xy, *lb.pad_xy] for lb in letterboxes], dtype=torch.float32, device=dev)
    scale = torch.tensor([[*lb.scale_xy, *lb.scale_xy] for lb in letterboxes], dtype=torch.float32, device=dev)
    limit = torch.tensor([[lb.frame_hw[1], lb.frame_hw[0]] * 2 for lb in letterboxes], dtype=torch.float32,
                         device=dev)
    frame_boxes = ((boxes - pads[:, None, :]) / scale[:, None, :]).clamp(min=0.0)
    frame_boxes = torch.minimum(frame_boxes, limit[:, None, :])
    # compact the kept rows (still by descending score) and copy only them to the host
    m = min(k, cfg.max_detections)
    rank = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :m]  # kept first, in order
    packed = torch.cat((torch.gather(frame_boxes, 1, rank[:, :, None].expand(bsz, m, 4)),
                        torch.gather(scores, 1, rank)[:, :, None],
                        torch.gather(classes, 1, rank)[:, :, None].to(torch.float32)), dim=2)
    return unpack_detections(keep.sum(dim=1).cpu().numpy(), packed.cpu().numpy())
