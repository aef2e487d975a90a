"""Training-time augmentation for the detector: H.264 re-encoding, HSV jitter, flip, scale/translate.

* :func:`h264_roundtrip` encodes frames as one H.264 clip with PyAV (libx264, yuv420p, ``preset
  ultrafast``, a given CRF) and decodes them back, so training images carry the blocking, ringing
  and chroma subsampling of the videos the pipeline decodes.
* :func:`augment_sample` applies the cheap per-batch augmentations of ultralytics
  (``data/augment.py``: ``RandomHSV``, ``RandomFlip``, ``RandomPerspective`` restricted to
  scale + translate, ``box_candidates`` filtering) to one letterboxed image with its boxes and masks.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import av
import cv2
import numpy as np
import numpy.typing as npt

from streamdet.constants import PAD_VALUE

U8 = npt.NDArray[np.uint8]
F32 = npt.NDArray[np.float32]


def h264_roundtrip(frames: Sequence[U8], *, crf: int, preset: str = "ultrafast", gop: int = 250) -> list[U8]:
    """Encode RGB frames as an H.264 clip (libx264, yuv420p) in memory and decode them back.

    Frames after the first are P-frames (scene-cut detection is off, one GOP of ``gop`` frames), as
    in the streams the pipeline reads. The encoder runs single-threaded, so the output is
    deterministic.

    Args:
        frames: ``(H, W, 3)`` uint8 RGB frames of one size, ``H`` and ``W`` even.
        crf: x264 constant rate factor (0..51; higher = stronger artifacts).
        preset: x264 preset.
        gop: keyframe interval.

    Returns:
        The decoded ``(H, W, 3)`` uint8 RGB frames, as many as given, in order.

    Raises:
        ValueError: on an empty list, mixed or odd sizes, or a CRF outside 0..51.
    """
    if not frames:
        raise ValueError("expected at least one frame, got 0")
    h, w = frames[0].shape[:2]
    if h % 2 or w % 2:
        raise ValueError(f"expected even frame size for yuv420p, got {(h, w)}")
    if not 0 <= crf <= 51:
        raise ValueError(f"expected crf in 0..51, got {crf}")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="h264") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height = w, h  # type: ignore[attr-defined]
        stream.pix_fmt = "yuv420p"  # type: ignore[attr-defined]
        stream.options = {"crf": str(crf), "preset": preset, "threads": "1",
                          "x264-params": f"scenecut=0:keyint={gop}:bframes=0"}
        for f in frames:
            if f.shape != (h, w, 3) or f.dtype != np.uint8:
                raise ValueError(f"expected ({h}, {w}, 3) uint8 frames, got {f.shape} {f.dtype}")
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    buf.seek(0)
    decoded: list[U8] = []
    with av.open(buf, mode="r", format="h264") as inp:
        for frame in inp.decode(video=0):
            decoded.append(np.asarray(frame.to_ndarray(format="rgb24"), dtype=np.uint8))
    if len(decoded) != len(frames):
        raise RuntimeError(f"H.264 round trip: expected {len(frames)} decoded frames, got {len(decoded)}")
    return decoded


@dataclass(frozen=True)
class AugmentConfig:
    """Per-batch augmentation settings (ultralytics hyperparameter names and defaults where they exist).

    Attributes:
        hsv_h: hue gain (fraction of the hue circle).
        hsv_s: saturation gain.
        hsv_v: value gain.
        fliplr: probability of a horizontal flip.
        scale: random scale in ``[1 - scale, 1 + scale]``.
        translate: random translation, fraction of the input size.
        min_box_px: drop boxes narrower or lower than this after the transform (input pixels).
        min_area_ratio: drop boxes that keep less than this fraction of their area (cut by the border).
        pad_value: fill for uncovered pixels.
    """

    hsv_h: float = 0.015
    hsv_s: float = 0.7
    hsv_v: float = 0.4
    fliplr: float = 0.5
    scale: float = 0.25
    translate: float = 0.1
    min_box_px: float = 2.0
    min_area_ratio: float = 0.2
    pad_value: int = PAD_VALUE

    def __post_init__(self) -> None:
        for name in ("hsv_h", "hsv_s", "hsv_v", "fliplr", "translate", "min_area_ratio"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"expected {name} in [0, 1], got {v}")
        if not 0.0 <= self.scale < 1.0:
            raise ValueError(f"expected scale in [0, 1), got {self.scale}")


NO_AUGMENT = AugmentConfig(hsv_h=0.0, hsv_s=0.0, hsv_v=0.0, fliplr=0.0, scale=0.0, translate=0.0)
"""Identity augmentation (validation)."""


def hsv_jitter(image: U8, rng: np.random.Generator, cfg: AugmentConfig) -> U8:
    """Random hue/saturation/value gains through lookup tables (ultralytics ``RandomHSV``).

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        rng: random generator.
        cfg: gains.

    Returns:
        A new ``(H, W, 3)`` uint8 RGB image.
    """
    if not (cfg.hsv_h or cfg.hsv_s or cfg.hsv_v):
        return image.copy()
    r = rng.uniform(-1, 1, 3) * np.array([cfg.hsv_h, cfg.hsv_s, cfg.hsv_v]) + 1
    hue, sat, val = cv2.split(cv2.cvtColor(image, cv2.COLOR_RGB2HSV))
    x = np.arange(0, 256, dtype=r.dtype)
    lut_hue = ((x * r[0]) % 180).astype(np.uint8)
    lut_sat = np.clip(x * r[1], 0, 255).astype(np.uint8)
    lut_val = np.clip(x * r[2], 0, 255).astype(np.uint8)
    hsv = cv2.merge((cv2.LUT(hue, lut_hue), cv2.LUT(sat, lut_sat), cv2.LUT(val, lut_val)))
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def _pixel_index_affine(ax: float, bx: float, ay: float, by: float) -> npt.NDArray[np.float64]:
    """cv2 matrix for the edge-coordinate map ``x' = ax x + bx``, ``y' = ay y + by``.

    cv2 places pixel ``i`` at coordinate ``i``; in edge coordinates its centre is ``i + 0.5``.
    """
    return np.array([[ax, 0.0, bx + 0.5 * ax - 0.5], [0.0, ay, by + 0.5 * ay - 0.5]], dtype=np.float64)


def augment_sample(
    image: U8,
    boxes_xyxy: F32,
    class_ids: npt.NDArray[np.int64],
    masks: U8 | None,
    rng: np.random.Generator,
    cfg: AugmentConfig,
) -> tuple[U8, F32, npt.NDArray[np.int64], U8 | None]:
    """Augment one letterboxed image with its boxes (and instance masks).

    Order: scale + translate (about the image centre), horizontal flip, HSV jitter. Boxes are
    transformed exactly (the transform is axis-aligned), clipped to the image, and dropped when
    smaller than ``min_box_px`` or left with less than ``min_area_ratio`` of their area.

    Args:
        image: ``(H, W, 3)`` uint8 RGB input-size image.
        boxes_xyxy: ``(N, 4)`` float32 xyxy boxes, input pixels.
        class_ids: ``(N,)`` int64 class ids.
        masks: ``(N, h, w)`` uint8 instance masks at ``1 / r`` of the input size (any integer
            ``r``, e.g. 4), or None.
        rng: random generator (the only source of randomness).
        cfg: :class:`AugmentConfig`.

    Returns:
        ``(image, boxes_xyxy, class_ids, masks)`` for the kept boxes (new arrays).
    """
    h, w = image.shape[:2]
    s = float(rng.uniform(1 - cfg.scale, 1 + cfg.scale)) if cfg.scale else 1.0
    tx = float(rng.uniform(-cfg.translate, cfg.translate)) * w if cfg.translate else 0.0
    ty = float(rng.uniform(-cfg.translate, cfg.translate)) * h if cfg.translate else 0.0
    flip = bool(rng.random() < cfg.fliplr) if cfg.fliplr else False
    # x' = s (x - w/2) + w/2 + tx, then optional flip x'' = w - x'
    a = -s if flip else s
    bx = (w - (s * (-w / 2) + w / 2 + tx)) if flip else s * (-w / 2) + w / 2 + tx
    by = s * (-h / 2) + h / 2 + ty
    identity = s == 1.0 and tx == 0.0 and ty == 0.0 and not flip
    if identity:
        out = image.copy()
    else:
        mat = _pixel_index_affine(a, bx, s, by)
        out = cv2.warpAffine(image, mat, (w, h), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=(cfg.pad_value,) * 3)
    b = boxes_xyxy.astype(np.float32, copy=True)
    if b.shape[0]:
        xs = b[:, [0, 2]] * a + bx
        b[:, 0], b[:, 2] = xs.min(1), xs.max(1)
        b[:, 1], b[:, 3] = b[:, 1] * s + by, b[:, 3] * s + by
        area0 = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        np.clip(b[:, 0::2], 0, w, out=b[:, 0::2])
        np.clip(b[:, 1::2], 0, h, out=b[:, 1::2])
        bw, bh = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
        keep = (bw >= cfg.min_box_px) & (bh >= cfg.min_box_px) & (bw * bh >= cfg.min_area_ratio * area0)
    else:
        keep = np.zeros(0, dtype=bool)
    m_out: U8 | None = None
    if masks is not None:
        km = masks[keep]
        if identity or km.shape[0] == 0:
            m_out = km.copy()
        else:
            mh, mw = km.shape[1:]
            r = mw / w
            mat_m = _pixel_index_affine(a, bx * r, s, by * r)
            warped = cv2.warpAffine(np.ascontiguousarray(km.transpose(1, 2, 0)), mat_m, (mw, mh),
                                    flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
            m_out = warped.reshape(mh, mw, -1).transpose(2, 0, 1).copy()
    out = hsv_jitter(out, rng, cfg)
    return out, b[keep], class_ids[keep].copy(), m_out
