"""Instance-mask helpers: prototype masks to frame masks, and COCO run-length encoding.

Instance segmentation heads of the YOLACT / ultralytics family predict, per detection, ``nm``
mask coefficients, and per image ``nm`` prototype maps at a quarter of the input resolution; a
detection's mask logits are the coefficient-weighted sum of the prototypes (one matrix product for
all detections). The logits are then brought to frame pixels through the inverse letterbox and
cut to the detection's box.

References:
    D. Bolya et al., "YOLACT: Real-time Instance Segmentation", ICCV 2019; ultralytics
    ``utils/ops.py`` (``process_mask_native``, ``crop_mask``, ``scale_masks``); pycocotools
    ``mask.py`` (``encode``, ``decode``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
from pycocotools import mask as mask_utils

from streamdet.boxes import FloatArray
from streamdet.letterbox import LetterboxParams

BoolArray = npt.NDArray[np.bool_]


def mask_logits(coeffs: npt.ArrayLike, protos: npt.ArrayLike) -> FloatArray:
    """Mask logits of K detections from their coefficients and the image's prototypes.

    Args:
        coeffs: ``(K, nm)`` float32 mask coefficients.
        protos: ``(nm, mh, mw)`` float32 prototype maps (proto pixels = input pixels * ``mh / ih``).

    Returns:
        ``(K, mh, mw)`` float32 logits (``sigmoid`` gives mask probabilities).

    Raises:
        ValueError: on mismatched shapes.
    """
    c = np.asarray(coeffs, dtype=np.float32)
    p = np.asarray(protos, dtype=np.float32)
    if p.ndim != 3:
        raise ValueError(f"expected protos of shape (nm, mh, mw), got {p.shape}")
    if c.ndim != 2 or c.shape[1] != p.shape[0]:
        raise ValueError(f"expected coeffs of shape (K, {p.shape[0]}), got {c.shape}")
    nm, mh, mw = p.shape
    # einsum (numpy's own loop, one thread): a BLAS call would wake its thread pool for a small
    # product, which costs more than the product on a CPU shared with the engine
    return (c @ p.reshape(nm, mh * mw)).reshape(c.shape[0], mh, mw)


def box_pixel_window(box_xyxy: Sequence[float], frame_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """Pixels of a frame whose centres lie inside a box.

    A pixel ``(x, y)`` (centre ``(x + 0.5, y + 0.5)``) belongs to box ``(x1, y1, x2, y2)`` when
    ``x1 <= x + 0.5 < x2`` and ``y1 <= y + 0.5 < y2``.

    Args:
        box_xyxy: one xyxy box in frame pixels.
        frame_hw: frame size ``(height, width)``.

    Returns:
        ``(x0, y0, x1, y1)``: the half-open pixel index window, clipped to the frame (may be empty).
    """
    fh, fw = frame_hw
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    xa = min(max(math.ceil(x1 - 0.5), 0), fw)
    xb = min(max(math.ceil(x2 - 0.5), 0), fw)
    ya = min(max(math.ceil(y1 - 0.5), 0), fh)
    yb = min(max(math.ceil(y2 - 0.5), 0), fh)
    return xa, ya, max(xa, xb), max(ya, yb)


def _check_mask_inputs(
    logits: npt.ArrayLike, boxes_xyxy: npt.ArrayLike, mask_threshold: float
) -> tuple[FloatArray, FloatArray]:
    lg = np.asarray(logits, dtype=np.float32)
    b = np.asarray(boxes_xyxy, dtype=np.float32)
    if lg.ndim != 3:
        raise ValueError(f"expected logits of shape (K, mh, mw), got {lg.shape}")
    if b.shape != (lg.shape[0], 4):
        raise ValueError(f"expected boxes_xyxy of shape ({lg.shape[0]}, 4), got {b.shape}")
    if not 0.0 < mask_threshold < 1.0:
        raise ValueError(f"expected mask_threshold in (0, 1), got {mask_threshold}")
    return lg, b


def _mask_windows(
    logits: FloatArray, boxes_xyxy: FloatArray, letterbox: LetterboxParams, mask_threshold: float
) -> Iterator[tuple[int, tuple[int, int, int, int], BoolArray]]:
    """Yield ``(i, (x0, y0, x1, y1), window)``: detection i's thresholded mask on its box's pixel window."""
    fh, fw = letterbox.frame_hw
    _, mh, mw = logits.shape
    iw, ih = letterbox.input_wh
    sx, sy = letterbox.scale_xy
    px, py = letterbox.pad_xy
    rx, ry = mw / iw, mh / ih
    # proto index coordinate u of frame pixel index x: u = ax * x + bx (pixel centres on both sides).
    ax, bx = sx * rx, (0.5 * sx + px) * rx - 0.5
    ay, by = sy * ry, (0.5 * sy + py) * ry - 0.5
    cut = float(math.log(mask_threshold / (1.0 - mask_threshold)))
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    for i in range(logits.shape[0]):
        x0, y0, x1, y1 = box_pixel_window(boxes_xyxy[i].tolist(), (fh, fw))
        if x1 <= x0 or y1 <= y0:
            continue
        m = np.array([[ax, 0.0, ax * x0 + bx], [0.0, ay, ay * y0 + by]], dtype=np.float64)
        win = cv2.warpAffine(logits[i], m, (x1 - x0, y1 - y0), flags=flags, borderMode=cv2.BORDER_REPLICATE)
        yield i, (x0, y0, x1, y1), win > cut


def prototype_masks_to_frame(
    logits: npt.ArrayLike,
    boxes_xyxy: npt.ArrayLike,
    letterbox: LetterboxParams,
    mask_threshold: float = 0.5,
) -> BoolArray:
    """Bring prototype-resolution mask logits to frame pixels, cut to each box, and threshold.

    For every frame pixel inside a detection's box, the logit is sampled bilinearly at the matching
    point of the prototype map: frame pixel centre -> input pixels through the letterbox (scale,
    then pad) -> prototype pixels (``* mw / iw``). This equals cutting the letterbox's valid region
    out of the prototype map and resizing it to the frame (``cv2.resize``, linear), including
    fractional pads, but only the box's pixels are computed (``cv2.warpAffine`` on the box
    window). Thresholding the logit at ``log(t / (1 - t))`` equals thresholding the sigmoid at
    ``t``; like ultralytics ``process_mask_native``, logits (not probabilities) are interpolated,
    and the crop is done in frame pixels (sharper than cropping in prototype pixels).

    Args:
        logits: ``(K, mh, mw)`` float32 mask logits (see :func:`mask_logits`).
        boxes_xyxy: ``(K, 4)`` float32 xyxy boxes in frame pixels.
        letterbox: the letterbox that produced the model input.
        mask_threshold: probability threshold in ``(0, 1)``.

    Returns:
        ``(K, fh, fw)`` bool masks in frame pixels, False outside each box.

    Raises:
        ValueError: on mismatched shapes or a threshold outside ``(0, 1)``.
    """
    lg, b = _check_mask_inputs(logits, boxes_xyxy, mask_threshold)
    fh, fw = letterbox.frame_hw
    out = np.zeros((lg.shape[0], fh, fw), dtype=bool)
    for i, (x0, y0, x1, y1), win in _mask_windows(lg, b, letterbox, mask_threshold):
        out[i, y0:y1, x0:x1] = win
    return out


def window_to_rle(window: npt.ArrayLike, x0: int, y0: int, frame_hw: tuple[int, int]) -> dict[str, Any]:
    """COCO RLE of a frame-sized mask that is zero outside one window, without building the frame.

    COCO RLE runs over the frame in column-major order, so the window's columns, taken at full frame
    height, are one contiguous stretch of it: the runs of that column slab (cost ``fh * bw``, not
    ``fh * fw``) plus the zeros before and after are the frame's runs.

    Args:
        window: ``(bh, bw)`` bool or uint8 mask of the window.
        x0: the window's left column in the frame.
        y0: its top row.
        frame_hw: frame size ``(height, width)``.

    Returns:
        ``{"size": [fh, fw], "counts": str}``, identical to :func:`masks_to_rle` of the full mask.

    Raises:
        ValueError: if the window does not fit in the frame.
    """
    fh, fw = frame_hw
    w = np.asarray(window)
    if w.ndim != 2:
        raise ValueError(f"expected a (bh, bw) window, got shape {w.shape}")
    bh, bw = w.shape
    if x0 < 0 or y0 < 0 or x0 + bw > fw or y0 + bh > fh:
        raise ValueError(f"expected the window inside the {fh}x{fw} frame, got {bh}x{bw} at ({x0}, {y0})")
    if bw == 0 or bh == 0 or not w.any():
        runs = np.asarray([fh * fw], dtype=np.int64)
    else:
        slab_t = np.zeros((bw, fh), dtype=np.uint8)  # column-major slab: one row per frame column
        slab_t[:, y0 : y0 + bh] = w.T != 0
        flat = slab_t.ravel()
        edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        runs = np.diff(np.concatenate(([0], edges, [flat.size]))).astype(np.int64)
        if flat[0]:
            runs = np.concatenate(([0], runs))  # RLE starts with a (possibly empty) run of zeros
        runs[0] += x0 * fh
        trailing = (fw - x0 - bw) * fh
        if trailing:
            if runs.size % 2:  # last run is zeros
                runs[-1] += trailing
            else:
                runs = np.concatenate((runs, [trailing]))
    rle = mask_utils.frPyObjects([{"counts": runs.tolist(), "size": [fh, fw]}], fh, fw)[0]
    return {"size": [fh, fw], "counts": rle["counts"].decode("ascii")}


def prototype_masks_to_rle(
    logits: npt.ArrayLike,
    boxes_xyxy: npt.ArrayLike,
    letterbox: LetterboxParams,
    mask_threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """COCO RLEs of the masks of :func:`prototype_masks_to_frame`, without frame-sized arrays.

    Memory and time scale with the boxes, not ``K * fh * fw`` (for evaluation with hundreds of
    detections per image).

    Args:
        logits: ``(K, mh, mw)`` float32 mask logits.
        boxes_xyxy: ``(K, 4)`` float32 xyxy boxes in frame pixels.
        letterbox: the letterbox that produced the model input.
        mask_threshold: probability threshold in ``(0, 1)``.

    Returns:
        ``K`` RLE dicts ``{"size": [fh, fw], "counts": str}`` (as :func:`masks_to_rle`).

    Raises:
        ValueError: on mismatched shapes or a threshold outside ``(0, 1)``.
    """
    lg, b = _check_mask_inputs(logits, boxes_xyxy, mask_threshold)
    frame_hw = letterbox.frame_hw
    empty = window_to_rle(np.zeros((0, 0), bool), 0, 0, frame_hw)
    rles = [empty] * lg.shape[0]
    for i, (x0, y0, _, _), win in _mask_windows(lg, b, letterbox, mask_threshold):
        rles[i] = window_to_rle(win, x0, y0, frame_hw)
    return rles


def masks_to_rle(masks: npt.ArrayLike) -> list[dict[str, Any]]:
    """COCO run-length encode binary masks, JSON-ready (identical to ``pycocotools.mask.encode``).

    Args:
        masks: ``(N, H, W)`` bool or uint8 masks (non-zero = inside).

    Returns:
        ``N`` dicts ``{"size": [H, W], "counts": str}`` (compressed COCO RLE, counts decoded as ASCII).

    Raises:
        ValueError: if ``masks`` is not 3-D.
    """
    m = np.asarray(masks)
    if m.ndim != 3:
        raise ValueError(f"expected masks of shape (N, H, W), got {m.shape}")
    if m.shape[0] == 0:
        return []
    # Only the columns between a mask's first and last non-zero column are run-length encoded
    # (window_to_rle: the rest are two runs of zeros), so the cost follows the objects' widths,
    # not N full frames; the result is pycocotools.mask.encode's, byte for byte.
    _, fh, fw = m.shape
    cols = np.asarray(m.any(axis=1))  # (N, W)
    out = []
    for i in range(m.shape[0]):
        nz = np.flatnonzero(cols[i])
        x0, x1 = (int(nz[0]), int(nz[-1]) + 1) if nz.size else (0, 0)
        out.append(window_to_rle(m[i, :, x0:x1], x0, 0, (fh, fw)))
    return out


def encode_rle(mask: npt.ArrayLike) -> dict[str, Any]:
    """COCO run-length encode one binary mask, JSON-ready (identical to ``pycocotools.mask.encode``).

    Args:
        mask: ``(H, W)`` bool or uint8 mask (non-zero = inside; for {0, 1} masks the result is
            ``pycocotools.mask.encode``'s, byte for byte, with ``counts`` decoded as ASCII).

    Returns:
        ``{"size": [H, W], "counts": str}`` (compressed COCO RLE).

    Raises:
        ValueError: if ``mask`` is not 2-D.
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"expected a mask of shape (H, W), got {m.shape}")
    return masks_to_rle(m[None])[0]


def rle_to_masks(rles: Sequence[dict[str, Any]]) -> npt.NDArray[np.uint8]:
    """Decode COCO RLEs (compressed, counts as str or bytes) to masks.

    Args:
        rles: dicts ``{"size": [H, W], "counts": str | bytes}``, all of one size.

    Returns:
        ``(N, H, W)`` uint8 {0, 1} masks (``(0, 0, 0)`` for an empty list).

    Raises:
        ValueError: if the RLEs are malformed or of different sizes.
    """
    if not rles:
        return np.zeros((0, 0, 0), dtype=np.uint8)
    objs = []
    for r in rles:
        if not isinstance(r, dict) or "size" not in r or "counts" not in r:
            raise ValueError(f"expected an RLE dict with size and counts, got {str(r)[:80]}")
        counts = r["counts"]
        if isinstance(counts, list):
            raise ValueError("expected compressed RLE counts (str or bytes), got an uncompressed list")
        objs.append({"size": [int(r["size"][0]), int(r["size"][1])],
                     "counts": counts.encode("ascii") if isinstance(counts, str) else counts})
    sizes = {tuple(o["size"]) for o in objs}
    if len(sizes) != 1:
        raise ValueError(f"expected RLEs of one size, got {sorted(sizes)}")
    with warnings.catch_warnings():  # pycocotools' __array__ lacks numpy 2's copy keyword
        warnings.simplefilter("ignore", DeprecationWarning)
        dec = mask_utils.decode(objs)  # (H, W, N)
    return np.ascontiguousarray(dec.transpose(2, 0, 1))


def class_map_to_rles(class_map: npt.ArrayLike) -> list[tuple[int, dict[str, Any]]]:
    """COCO RLE of each class present in a semantic class map (the map's lossless, standard form).

    Every pixel belongs to exactly one of the returned masks, so :func:`rles_to_class_map` gives the
    map back exactly.

    Args:
        class_map: ``(H, W)`` uint8 map of class ids.

    Returns:
        ``(class_id, {"size": [H, W], "counts": str})`` for every class present, by class id.

    Raises:
        ValueError: if ``class_map`` is not a 2-D uint8 array.
    """
    m = np.asarray(class_map)
    if m.ndim != 2 or m.dtype != np.uint8:
        raise ValueError(f"expected an (H, W) uint8 class map, got {m.shape} {m.dtype}")
    if m.size == 0:
        return []
    present = np.flatnonzero(np.bincount(m.ravel(), minlength=256))
    stack = m[None, :, :] == present.astype(np.uint8)[:, None, None]
    return [(int(k), rle) for k, rle in zip(present.tolist(), masks_to_rle(stack), strict=True)]


def rles_to_class_map(rles: Sequence[tuple[int, dict[str, Any]]], background: int = 0) -> npt.NDArray[np.uint8]:
    """Rebuild a class map from per-class COCO RLEs (the inverse of :func:`class_map_to_rles`).

    Args:
        rles: ``(class_id, rle)`` pairs, class ids in ``0..255``, all RLEs of one size.
        background: class of pixels no mask covers.

    Returns:
        ``(H, W)`` uint8 class map (``(0, 0)`` for an empty list); where masks overlap the later one wins.

    Raises:
        ValueError: on malformed RLEs, sizes that differ, or a class id outside ``0..255``.
    """
    if not rles:
        return np.zeros((0, 0), dtype=np.uint8)
    ids = [int(k) for k, _ in rles]
    if any(not 0 <= k <= 255 for k in ids):
        raise ValueError(f"expected class ids in 0..255, got {ids}")
    masks = rle_to_masks([r for _, r in rles])
    out = np.full(masks.shape[1:], background, dtype=np.uint8)
    for k, m in zip(ids, masks, strict=True):
        out[m != 0] = k
    return out
