"""Draw detections on a frame with OpenCV: boxes, labels, instance masks, semantic class maps, cascade children."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from streamdet.cascade import Children

# 20 distinct RGB colours (the "tab20"-like palette ultralytics uses for classes)
PALETTE_RGB: tuple[tuple[int, int, int], ...] = (
    (255, 56, 56), (255, 157, 151), (255, 112, 31), (255, 178, 29), (207, 210, 49),
    (72, 249, 10), (146, 204, 23), (61, 219, 134), (26, 147, 52), (0, 212, 187),
    (44, 153, 168), (0, 194, 255), (52, 69, 147), (100, 115, 255), (0, 24, 236),
    (132, 56, 255), (82, 0, 133), (203, 56, 255), (255, 149, 200), (255, 55, 199),
)


def class_color(class_id: int) -> tuple[int, int, int]:
    """The palette colour ``(r, g, b)`` of a class id."""
    return PALETTE_RGB[int(class_id) % len(PALETTE_RGB)]


def draw_detections(
    image_rgb: npt.NDArray[np.uint8],
    boxes_xyxy: npt.NDArray[np.float32],
    scores: npt.NDArray[np.float32],
    class_ids: npt.NDArray[np.int64],
    class_names: Sequence[str],
    *,
    masks: npt.NDArray[Any] | None = None,
    mask_alpha: float = 0.4,
    thickness: int = 2,
) -> npt.NDArray[np.uint8]:
    """Draw boxes with ``label score`` captions (and masks, blended) onto an image, in place.

    Args:
        image_rgb: ``(H, W, 3)`` uint8 RGB image, modified in place.
        boxes_xyxy: ``(N, 4)`` float32 xyxy boxes in the image's pixels.
        scores: ``(N,)`` float32 scores.
        class_ids: ``(N,)`` int class ids.
        class_names: names by class id (ids past the end are shown as numbers).
        masks: optional ``(N, H, W)`` bool/uint8 instance masks, drawn as a translucent fill in the
            class colour with an outline (``cv2.findContours``, external contours).
        mask_alpha: mask blend weight.
        thickness: box line width in pixels.

    Returns:
        ``image_rgb``.

    Raises:
        ValueError: if the image is not ``(H, W, 3)`` uint8 or the arrays disagree in length.
    """
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
        raise ValueError(f"expected (H, W, 3) uint8 image, got {image_rgb.shape} {image_rgb.dtype}")
    n = len(boxes_xyxy)
    if len(scores) != n or len(class_ids) != n:
        raise ValueError(f"expected {n} scores and class ids, got {len(scores)} and {len(class_ids)}")
    h, w = image_rgb.shape[:2]
    if masks is not None and len(masks) == n and n and masks.shape[1:] == (h, w):
        for i in range(n):
            m = masks[i].astype(bool, copy=False)
            color = class_color(int(class_ids[i]))
            tint = np.array(color, dtype=np.float32)
            image_rgb[m] = (image_rgb[m] * (1.0 - mask_alpha) + tint * mask_alpha).astype(np.uint8)
            contours, _ = cv2.findContours(m.view(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(image_rgb, contours, -1, color, max(1, thickness // 2), cv2.LINE_AA)
    font = cv2.FONT_HERSHEY_SIMPLEX
    scale = max(0.4, min(h, w) / 1000.0)
    for (x1, y1, x2, y2), score, cid in zip(boxes_xyxy.tolist(), scores.tolist(), class_ids.tolist(), strict=True):
        color = class_color(cid)
        p1 = (int(round(x1)), int(round(y1)))
        p2 = (int(round(x2)), int(round(y2)))
        cv2.rectangle(image_rgb, p1, p2, color, thickness, cv2.LINE_AA)
        name = class_names[cid] if 0 <= cid < len(class_names) else str(cid)
        text = f"{name} {score:.2f}"
        (tw, th), base = cv2.getTextSize(text, font, scale, 1)
        ty = p1[1] - 2 if p1[1] - th - base - 2 >= 0 else p1[1] + th + 2
        cv2.rectangle(image_rgb, (p1[0], ty - th - 2), (p1[0] + tw + 2, ty + base - 1), color, -1)
        cv2.putText(image_rgb, text, (p1[0] + 1, ty - 1), font, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return image_rgb


def draw_semantic(
    image_rgb: npt.NDArray[np.uint8],
    class_map: npt.NDArray[np.uint8],
    *,
    alpha: float = 0.45,
    background_id: int | None = 0,
) -> npt.NDArray[np.uint8]:
    """Blend a semantic class map onto an image as a translucent class-colour overlay, in place.

    Args:
        image_rgb: ``(H, W, 3)`` uint8 RGB image, modified in place.
        class_map: ``(H, W)`` uint8 class ids (same size as the image).
        alpha: overlay weight in ``[0, 1]``.
        background_id: class left untinted (None: tint every class).

    Returns:
        ``image_rgb``.

    Raises:
        ValueError: if the image is not ``(H, W, 3)`` uint8 or the map is not ``(H, W)`` uint8.
    """
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
        raise ValueError(f"expected (H, W, 3) uint8 image, got {image_rgb.shape} {image_rgb.dtype}")
    if class_map.shape != image_rgb.shape[:2] or class_map.dtype != np.uint8:
        raise ValueError(f"expected a {image_rgb.shape[:2]} uint8 class map, got {class_map.shape} {class_map.dtype}")
    lut = np.array([class_color(k) for k in range(256)], dtype=np.float32)  # (256, 3) colour per class
    tinted = lut[class_map]
    keep = class_map != background_id if background_id is not None else np.ones(class_map.shape, bool)
    blended = image_rgb[keep] * (1.0 - alpha) + tinted[keep] * alpha
    image_rgb[keep] = blended.astype(np.uint8)
    return image_rgb


def draw_children(image_rgb: npt.NDArray[np.uint8], parents_xyxy: npt.NDArray[np.float32],
                  children: Mapping[int, Sequence[Children]], *, thickness: int = 1) -> npt.NDArray[np.uint8]:
    """Draw secondary models' results (a cascade) in place: child boxes, and text read under its parent box.

    Each child box is drawn in its class colour, ``thickness`` wide, without a caption (a plate's
    characters are a few pixels tall). Text read from a parent's children (``read_text``) is
    written under the parent box, white on black, or above it at the bottom edge of the image.

    Args:
        image_rgb: ``(H, W, 3)`` uint8 RGB image, modified in place.
        parents_xyxy: ``(N, 4)`` float32 xyxy boxes of the primary detections, image pixels.
        children: :class:`~streamdet.cascade.Children` lists by parent index (``detections`` in
            image pixels, ``text``); indices past ``N`` are ignored.
        thickness: child box line width in pixels.

    Returns:
        ``image_rgb``.
    """
    h, w = image_rgb.shape[:2]
    font = cv2.FONT_HERSHEY_SIMPLEX
    scale = max(0.5, min(h, w) / 800.0)
    for parent, found in children.items():
        if not 0 <= parent < len(parents_xyxy):
            continue
        for ch in found:
            d = ch.detections
            for (x1, y1, x2, y2), cid in zip(d.boxes_xyxy.tolist(), d.class_ids.tolist(), strict=True):
                cv2.rectangle(image_rgb, (int(round(x1)), int(round(y1))), (int(round(x2)), int(round(y2))),
                              class_color(cid), thickness, cv2.LINE_AA)
        text = next((ch.text for ch in found if ch.text), None)
        if text:
            x1, _, _, y2 = (int(round(v)) for v in parents_xyxy[parent].tolist())
            (tw, th), base = cv2.getTextSize(text, font, scale, 2)
            top = y2 + 2 if y2 + 2 + th + base + 2 <= h else max(0, y2 - th - base - 4)
            x = min(max(0, x1), max(0, w - tw - 4))
            cv2.rectangle(image_rgb, (x, top), (x + tw + 4, top + th + base + 2), (0, 0, 0), -1)
            cv2.putText(image_rgb, text, (x + 2, top + th + 1), font, scale, (255, 255, 255), 2, cv2.LINE_AA)
    return image_rgb


def annotate_result(image_rgb: npt.NDArray[np.uint8], detections: Any, class_names: Sequence[str],
                    children: Mapping[int, Sequence[Children]] | None = None) -> npt.NDArray[np.uint8]:
    """Draw one frame's results as the annotated-video sink and the preview page show them, in place.

    Semantic class maps first (when the map has the image's size; class 0 left untinted when it
    is named background), then instance masks (decoded from their COCO RLEs if need be), then
    boxes with ``label score`` captions, then the secondary models' children and text
    (:func:`draw_children`).

    Args:
        image_rgb: ``(H, W, 3)`` uint8 RGB frame (decoded-frame pixels), modified in place.
        detections: a ``streamdet.postprocess.Detections`` in frame pixels (``boxes_xyxy``,
            ``scores``, ``class_ids``; optional ``masks``, ``mask_rles``, ``semantic``).
        class_names: names by class id.
        children: secondary models' results by detection index (a cascade), or None.

    Returns:
        ``image_rgb``.
    """
    d = detections
    semantic = getattr(d, "semantic", None)
    if semantic is not None and semantic.shape == image_rgb.shape[:2]:
        bg = 0 if class_names and class_names[0].lower() in ("background", "bg", "__background__") else None
        draw_semantic(image_rgb, semantic, background_id=bg)
    masks = getattr(d, "masks", None)
    rles = getattr(d, "mask_rles", None)
    if masks is None and rles:
        from streamdet.masks import rle_to_masks

        masks = rle_to_masks(rles)
    draw_detections(image_rgb, d.boxes_xyxy, d.scores, d.class_ids, class_names, masks=masks)
    if children:
        draw_children(image_rgb, d.boxes_xyxy, children)
    return image_rgb
