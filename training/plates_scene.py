"""Plate-scene frames: vehicles carrying license plates over frames of the real background clips.

See :mod:`training.plates` for the scene as a whole. A frame (:func:`make_plate_sample`) holds 0 to
4 vehicles (car- or motorbike-like bodies), each with a plate (:mod:`training.plates_render`),
nearer (larger) ones in front, some plates partly hidden by a pole, another vehicle or the frame
edge (``ignore`` when less than half is visible), then sensor noise and sometimes a blur.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import cv2
import numpy as np
import numpy.typing as npt

from training.plates_render import (
    PlatePose,
    PlateStyle,
    WarpedPlate,
    clip_window,
    composite,
    plate_height_px,
    plate_homography,
    plate_quad,
    random_pose,
    random_style,
    render_plate,
    warp_plate,
)
from training.synth import Sample, background, mask_box_xyxy

PLATE_NAMES: tuple[str, ...] = ("plate",)
"""Class names of the plate detector."""
MIN_PLATE_PX, MAX_PLATE_PX = 16.0, 120.0
"""Plate height range on a 1280x720 frame, pixels."""
IGNORE_VISIBLE_FRACTION = 0.5
"""Plates and characters with less of their area visible than this are ``ignore`` (COCO crowd)."""


U8 = npt.NDArray[np.uint8]
F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Vehicle:
    """One vehicle with its plate.

    Attributes:
        style: the plate's look and text.
        pose: the plate's placement on the frame.
        kind: ``"car"`` or ``"moto"`` (body proportions).
        body_rgb: body colour.
        body_scale: body width / plate width.
        blur_sigma: defocus of the plate, pixels (0: sharp).
        pole: optional occluder in front of the plate: ``(x offset, width)`` as fractions of the
            plate width from its centre, and its grey level; ``None`` for none.
    """

    style: PlateStyle
    pose: PlatePose
    kind: Literal["car", "moto"]
    body_rgb: tuple[int, int, int]
    body_scale: float
    blur_sigma: float
    pole: tuple[float, float, int] | None = None


def random_vehicle(rng: np.random.Generator, frame_wh: tuple[int, int], *, height_px: float | None = None,
                   center_xy: tuple[float, float] | None = None, occlude: float = 0.15) -> Vehicle:
    """Draw a random vehicle and plate.

    Args:
        rng: random generator (consumed).
        frame_wh: frame size ``(width, height)``.
        height_px: plate height (default: log-uniform in 16..120 px).
        center_xy: plate centre (default: anywhere on the frame, rarely cut by its edge).
        occlude: probability of a pole in front of the plate.

    Returns:
        The :class:`Vehicle`.
    """
    w, h = frame_wh
    style = random_style(rng)
    if height_px is None:
        height_px = float(np.exp(rng.uniform(np.log(MIN_PLATE_PX), np.log(MAX_PLATE_PX))))
    if center_xy is None:
        m = 0.0 if rng.random() < 0.1 else 2.5 * height_px
        center_xy = (float(rng.uniform(min(m, w / 2), max(w - m, w / 2))),
                     float(rng.uniform(min(m * 0.5, h / 2), max(h - m * 0.5, h / 2))))
    pose = random_pose(rng, center_xy, height_px)
    kind: Literal["car", "moto"] = "moto" if rng.random() < 0.25 else "car"
    body = tuple(int(v) for v in rng.integers(0, 256, 3))
    pole = None
    if rng.random() < occlude:
        pole = (float(rng.uniform(-0.6, 0.6)), float(rng.uniform(0.08, 0.5)), int(rng.integers(20, 200)))
    blur = float(rng.uniform(0.3, 1.2)) if rng.random() < 0.3 else 0.0
    return Vehicle(style, pose, kind, (body[0], body[1], body[2]),
                   float(rng.uniform(1.25, 1.6) if kind == "moto" else rng.uniform(2.2, 4.0)), blur, pole)


def _draw_body(image: U8, v: Vehicle, plate_w: float, cover: U8) -> None:
    """Draw the vehicle body behind the plate (in place); mark its pixels in ``cover``."""
    cx, cy = v.pose.center_xy
    ph = v.pose.height_px
    bw = plate_w * v.body_scale
    bh = bw * (0.55 if v.kind == "car" else 1.1)
    x0, x1 = cx - bw / 2, cx + bw / 2
    y1 = cy + ph * (1.6 if v.kind == "car" else 1.2)
    y0 = y1 - bh
    col = tuple(float(c) for c in v.body_rgb)
    dark = tuple(float(c) * 0.35 for c in v.body_rgb)
    r = max(2, int(min(bw, bh) * 0.12))
    layer = np.zeros(image.shape[:2], np.uint8)
    pts = [(int(x0 + r), int(y0)), (int(x1 - r), int(y0)), (int(x1), int(y0 + r)), (int(x1), int(y1 - r)),
           (int(x1 - r), int(y1)), (int(x0 + r), int(y1)), (int(x0), int(y1 - r)), (int(x0), int(y0 + r))]
    cv2.fillPoly(layer, [np.array(pts, np.int32)], 1)
    image[layer > 0] = np.array(col, np.uint8)
    if v.kind == "car":  # rear window, lights, bumper
        cv2.rectangle(image, (int(x0 + 0.15 * bw), int(y0 + 0.08 * bh)), (int(x1 - 0.15 * bw), int(y0 + 0.38 * bh)),
                      (40, 50, 60), -1)
        lw = 0.12 * bw
        for lx in (x0 + 0.04 * bw, x1 - 0.04 * bw - lw):
            cv2.rectangle(image, (int(lx), int(y0 + 0.45 * bh)), (int(lx + lw), int(y0 + 0.6 * bh)), (200, 30, 30), -1)
        cv2.line(image, (int(x0), int(cy + 0.8 * ph)), (int(x1), int(cy + 0.8 * ph)), dark, max(1, int(ph * 0.15)))
    else:  # tyre below the plate
        cv2.ellipse(image, (int(cx), int(y1 + 0.1 * bh)), (max(1, int(0.12 * bw)), max(1, int(0.3 * bh))), 0, 0, 360,
                    (20, 20, 20), -1)
    cover |= layer


@dataclass(frozen=True)
class PlateSample(Sample):
    """A plate-scene frame: the detector's :class:`~training.synth.Sample` (class 0 ``plate``), texts, characters.

    Attributes:
        texts: ``N`` plate texts, one per plate box.
        plate_heights_px: ``(N,)`` float32 plate heights (mean of the left and right edges), frame pixels.
        char_boxes_xyxy: ``(M, 4)`` float32 tight boxes of the visible character pixels, frame pixels.
        char_class_ids: ``(M,)`` int64 indices into :data:`CHAR_NAMES`.
        char_plate_index: ``(M,)`` int64 index of each character's plate (into the plate boxes).
        char_masks: ``(M, H, W)`` uint8 {0, 1} visible glyph pixels.
        char_ignore: ``(M,)`` bool, less than half of the character visible.
    """

    texts: tuple[str, ...] = ()
    plate_heights_px: F32 = field(default_factory=lambda: np.zeros(0, np.float32))
    char_boxes_xyxy: F32 = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    char_class_ids: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))
    char_plate_index: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))
    char_masks: U8 = field(default_factory=lambda: np.zeros((0, 0, 0), np.uint8))
    char_ignore: npt.NDArray[np.bool_] = field(default_factory=lambda: np.zeros(0, bool))

    def __post_init__(self) -> None:
        super().__post_init__()
        n, m = self.boxes_xyxy.shape[0], self.char_boxes_xyxy.shape[0]
        h, w = self.image.shape[:2]
        if len(self.texts) != n or self.plate_heights_px.shape != (n,):
            raise ValueError(f"expected {n} texts and plate heights, got {len(self.texts)} and "
                             f"{self.plate_heights_px.shape}")
        if (self.char_boxes_xyxy.shape != (m, 4) or self.char_class_ids.shape != (m,)
                or self.char_plate_index.shape != (m,) or self.char_ignore.shape != (m,)
                or self.char_masks.shape != (m, h, w)):
            raise ValueError(f"expected {m} characters with (M, {h}, {w}) masks, got class ids "
                             f"{self.char_class_ids.shape}, plate index {self.char_plate_index.shape}, "
                             f"ignore {self.char_ignore.shape}, masks {self.char_masks.shape}")
        if m and (self.char_plate_index.min() < 0 or self.char_plate_index.max() >= n):
            raise ValueError(f"expected character plate indices in [0, {n}), got {self.char_plate_index}")


def compose_vehicles(bg: U8, vehicles: list[Vehicle], rng: np.random.Generator, *, noise_sigma: float = 0.0,
                     with_chars: bool = True, ignore_visible_fraction: float = IGNORE_VISIBLE_FRACTION) -> PlateSample:
    """Draw vehicles over a background, later ones in front, and build the annotations.

    Args:
        bg: ``(H, W, 3)`` uint8 RGB background (not modified).
        vehicles: bottom first.
        rng: random generator for the sensor noise (consumed only when ``noise_sigma > 0``).
        noise_sigma: Gaussian sensor noise, grey levels.
        with_chars: compute the character annotations (else they are empty; the picture is the same).
        ignore_visible_fraction: plates (characters) with less of their whole area visible are ``ignore``.

    Returns:
        The :class:`PlateSample`; plates with no visible pixel are left out.
    """
    h, w = bg.shape[:2]
    image = bg.copy()
    plates: list[tuple[U8, float, int, WarpedPlate]] = []  # full-frame visible mask, full area, vehicle index, warp
    chars: list[list[tuple[U8, float]]] = []
    for vi, v in enumerate(vehicles):
        drawing = render_plate(v.style)
        hom = plate_homography(v.pose, drawing.size_wh)
        quad = plate_quad(v.pose, drawing.size_wh)
        cover = np.zeros((h, w), np.uint8)
        _draw_body(image, v, float(np.linalg.norm(quad[1] - quad[0])), cover)
        wp = warp_plate(drawing, hom)
        composite(image, wp, v.blur_sigma)
        tr, tc, wr, wcs = clip_window(wp.window, (w, h))
        full = np.zeros((h, w), np.uint8)
        full[tr, tc] = wp.plate_mask[wr, wcs]
        cover |= full
        cmasks: list[tuple[U8, float]] = []
        if with_chars:
            for k in range(wp.char_masks.shape[0]):
                cm = np.zeros((h, w), np.uint8)
                cm[tr, tc] = wp.char_masks[k][wr, wcs]
                cmasks.append((cm, float(wp.char_masks[k].sum())))
        if v.pole is not None:
            off, pw, grey = v.pole
            plate_w = float(np.linalg.norm(quad[1] - quad[0]))
            px = v.pose.center_xy[0] + off * plate_w
            x0, x1 = int(round(px - pw * plate_w / 2)), int(round(px + pw * plate_w / 2))
            pole = np.zeros((h, w), np.uint8)
            pole[:, max(0, x0) : max(0, min(w, x1))] = 1
            image[pole > 0] = grey
            cover |= pole
        for prev_mask, _, _, _ in plates:
            prev_mask &= 1 - cover
        for prev_chars in chars:
            for cm, _ in prev_chars:
                cm &= 1 - cover
        if v.pole is not None:
            full &= 1 - pole
            for cm, _ in cmasks:
                cm &= 1 - pole
        plates.append((full, float(wp.plate_mask.sum()), vi, wp))
        chars.append(cmasks)
    if noise_sigma > 0:
        noise = rng.normal(0.0, noise_sigma, size=image.shape).astype(np.float32)
        image = np.clip(image.astype(np.float32) + noise + 0.5, 0, 255).astype(np.uint8)
    return _plate_sample(image, vehicles, plates, chars, ignore_visible_fraction)


def _plate_sample(image: U8, vehicles: list[Vehicle], plates: list[tuple[U8, float, int, WarpedPlate]],
                  chars: list[list[tuple[U8, float]]], ignore_fraction: float) -> PlateSample:
    h, w = image.shape[:2]
    boxes: list[tuple[float, float, float, float]] = []
    cboxes: list[tuple[float, float, float, float]] = []
    masks: list[U8] = []
    cmasks: list[U8] = []
    ignore: list[bool] = []
    cignore: list[bool] = []
    texts: list[str] = []
    heights: list[float] = []
    cclasses: list[int] = []
    cplate: list[int] = []
    semantic = np.zeros((h, w), np.uint8)
    for (m, area, vi, _), cm_list in zip(plates, chars, strict=True):
        box = mask_box_xyxy(m)
        if box is None:
            continue
        v = vehicles[vi]
        pi = len(boxes)
        boxes.append(box)
        masks.append(m)
        ignore.append(bool(m.sum() < ignore_fraction * area))
        texts.append(v.style.text)
        heights.append(plate_height_px(plate_quad(v.pose, render_plate(v.style).size_wh)))
        semantic[m > 0] = 1
        for (cm, carea), cid in zip(cm_list, v.style.class_ids.tolist() if cm_list else [], strict=True):
            cb = mask_box_xyxy(cm)
            if cb is None:
                continue
            cboxes.append(cb)
            cclasses.append(cid)
            cplate.append(pi)
            cmasks.append(cm)
            cignore.append(bool(cm.sum() < ignore_fraction * carea))
    n, k = len(boxes), len(cboxes)
    return PlateSample(
        image=image,
        boxes_xyxy=np.asarray(boxes, np.float32).reshape(n, 4),
        class_ids=np.zeros(n, np.int64),
        masks=np.stack(masks) if n else np.zeros((0, h, w), np.uint8),
        semantic=semantic,
        ignore=np.asarray(ignore, bool).reshape(n),
        texts=tuple(texts),
        plate_heights_px=np.asarray(heights, np.float32).reshape(n),
        char_boxes_xyxy=np.asarray(cboxes, np.float32).reshape(k, 4),
        char_class_ids=np.asarray(cclasses, np.int64).reshape(k),
        char_plate_index=np.asarray(cplate, np.int64).reshape(k),
        char_masks=np.stack(cmasks) if k else np.zeros((0, h, w), np.uint8),
        char_ignore=np.asarray(cignore, bool).reshape(k),
    )


def make_plate_sample(seed: int, index: int, frame_wh: tuple[int, int] = (1280, 720), *,
                      with_chars: bool = True) -> PlateSample:
    """The ``index``-th frame of the plate scene with seed ``seed``.

    Args:
        seed: dataset seed.
        index: image index.
        frame_wh: frame size ``(width, height)``.
        with_chars: compute the character annotations (the picture and plates are the same either way).

    Returns:
        The :class:`PlateSample` (a pure function of the arguments).
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, index, 0x9A7E]))
    bg = background(rng, frame_wh)
    n = int(rng.choice(5, p=[0.1, 0.3, 0.3, 0.2, 0.1]))
    vehicles = [random_vehicle(rng, frame_wh) for _ in range(n)]
    vehicles.sort(key=lambda v: v.pose.height_px)  # nearer (larger) plates in front
    sample = compose_vehicles(bg, vehicles, rng, noise_sigma=float(rng.uniform(0, 6)), with_chars=with_chars)
    if rng.random() < 0.15:
        k = int(rng.choice([3, 5]))
        sample = _replace_image(sample, cv2.GaussianBlur(sample.image, (k, k), 0))
    return sample


def _replace_image(s: PlateSample, image: U8) -> PlateSample:
    return PlateSample(image, s.boxes_xyxy, s.class_ids, s.masks, s.semantic, s.ignore, s.texts, s.plate_heights_px,
                       s.char_boxes_xyxy, s.char_class_ids, s.char_plate_index, s.char_masks, s.char_ignore)



class PlateDataset:
    """Deterministic, indexable frames of the plate scene (interface of :class:`training.synth.SyntheticDataset`).

    Args:
        seed: dataset seed.
        num_images: number of frames.
        frame_wh: frame size ``(width, height)``.
        with_chars: compute the character annotations.

    Raises:
        ValueError: on a negative ``num_images``.
    """

    def __init__(self, *, seed: int, num_images: int, frame_wh: tuple[int, int] = (1280, 720),
                 with_chars: bool = True) -> None:
        if num_images < 0:
            raise ValueError(f"expected num_images >= 0, got {num_images}")
        self.seed, self.num_images, self.frame_wh, self.with_chars = seed, num_images, frame_wh, with_chars

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> PlateSample:
        if not 0 <= index < self.num_images:
            raise IndexError(f"expected index in [0, {self.num_images}), got {index}")
        return make_plate_sample(self.seed, index, self.frame_wh, with_chars=self.with_chars)
