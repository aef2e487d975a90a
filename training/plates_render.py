"""License-plate drawing: the plate in its own (canonical) pixels, and its perspective warp onto an image.

A plate is first drawn upright at :data:`CANON_H` pixels high (:func:`render_plate`): a light
rectangle, an optional dark border, and one dark glyph per character, each glyph from an OpenCV
Hershey font with a stroke of 12-20 % of the character height. The per-character masks are the
glyph pixels. :func:`warp_plate` then maps the plate through a homography onto an image window,
supersampled and area-averaged, so the picture is anti-aliased and the masks (coverage >= 0.5) are
the warped glyphs on the target's pixel grid.

Coordinates: homographies map *edge* coordinates (pixel ``i`` spans ``[i, i + 1)``, its centre is
``i + 0.5``), the convention of :mod:`streamdet.letterbox` and of pycocotools boxes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np
import numpy.typing as npt

U8 = npt.NDArray[np.uint8]
F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

CHAR_NAMES: tuple[str, ...] = (*"0123456789", *"ACEHKMPTXY")
"""Character classes: digits, then ten letters that no Hershey font draws like a digit (no O/0,
I/1, B/8, S/5, Z/2, G/6, D/0); class id ``k`` is ``CHAR_NAMES[k]``."""

FONTS: tuple[int, ...] = (
    cv2.FONT_HERSHEY_SIMPLEX,
    cv2.FONT_HERSHEY_DUPLEX,
    cv2.FONT_HERSHEY_COMPLEX,
    cv2.FONT_HERSHEY_TRIPLEX,
    cv2.FONT_HERSHEY_PLAIN,
)
"""OpenCV fonts the characters are drawn in (the script fonts are left out: not plate-like)."""

CANON_H = 128
"""Height of the upright plate drawing, pixels (plates are warped down from it)."""
MIN_CHARS, MAX_CHARS = 4, 8


@dataclass(frozen=True)
class PlateStyle:
    """Everything that fixes how one plate looks (hashable, so its drawing is cached).

    Attributes:
        text: the characters, each in :data:`CHAR_NAMES` (4 to 8 of them).
        font: an OpenCV Hershey font id from :data:`FONTS`.
        char_h_frac: character height / plate height.
        stroke_frac: glyph stroke / character height (>= 0.12).
        gap_frac: gap between characters / character height.
        margin_frac: left and right margin / plate height.
        group_gap_at: index of a character preceded by an extra gap (0: none).
        plate_rgb: plate colour.
        ink_rgb: character (and border) colour.
        border: draw a dark border.
        shade: left-to-right brightness change of the plate, grey levels.

    Raises:
        ValueError: on characters outside :data:`CHAR_NAMES`, a length outside 4..8, or fractions
            out of range.
    """

    text: str
    font: int
    char_h_frac: float
    stroke_frac: float
    gap_frac: float
    margin_frac: float
    group_gap_at: int
    plate_rgb: tuple[int, int, int]
    ink_rgb: tuple[int, int, int]
    border: bool
    shade: float

    def __post_init__(self) -> None:
        if not MIN_CHARS <= len(self.text) <= MAX_CHARS or any(c not in CHAR_NAMES for c in self.text):
            raise ValueError(f"expected {MIN_CHARS}-{MAX_CHARS} characters of {''.join(CHAR_NAMES)}, "
                             f"got {self.text!r}")
        if self.font not in FONTS:
            raise ValueError(f"expected a font of {FONTS}, got {self.font}")
        if not 0.4 <= self.char_h_frac <= 0.8 or not 0.12 <= self.stroke_frac <= 0.3:
            raise ValueError(f"expected char_h_frac in [0.4, 0.8] and stroke_frac in [0.12, 0.3], "
                             f"got {self.char_h_frac}, {self.stroke_frac}")

    @property
    def class_ids(self) -> npt.NDArray[np.int64]:
        """``(len(text),)`` int64 class ids of the characters, left to right."""
        return np.array([CHAR_NAMES.index(c) for c in self.text], dtype=np.int64)


def random_style(rng: np.random.Generator) -> PlateStyle:
    """Draw a random plate look and text.

    Args:
        rng: random generator (consumed).

    Returns:
        The :class:`PlateStyle`.
    """
    n = int(rng.integers(MIN_CHARS, MAX_CHARS + 1))
    digits, letters = CHAR_NAMES[:10], CHAR_NAMES[10:]
    p_letter = float(rng.uniform(0.15, 0.5))
    text = "".join(str(rng.choice(letters)) if rng.random() < p_letter else str(rng.choice(digits))
                   for _ in range(n))
    kind = rng.random()
    if kind < 0.55:  # white
        base = rng.integers(215, 256)
        plate = tuple(int(np.clip(base + rng.integers(-12, 8), 0, 255)) for _ in range(3))
    elif kind < 0.85:  # yellow
        plate = (int(rng.integers(215, 256)), int(rng.integers(180, 230)), int(rng.integers(10, 90)))
    else:  # light grey / tinted
        base = rng.integers(175, 215)
        plate = tuple(int(np.clip(base + rng.integers(-15, 16), 0, 255)) for _ in range(3))
    ink_kind = rng.random()
    if ink_kind < 0.75:
        v = int(rng.integers(0, 55))
        ink = (v, v, v)
    elif ink_kind < 0.9:
        ink = (int(rng.integers(0, 40)), int(rng.integers(0, 50)), int(rng.integers(60, 120)))
    else:
        ink = (int(rng.integers(70, 130)), int(rng.integers(0, 30)), int(rng.integers(0, 30)))
    return PlateStyle(
        text=text,
        font=int(FONTS[int(rng.integers(len(FONTS)))]),
        char_h_frac=float(rng.uniform(0.56, 0.72)),
        stroke_frac=float(rng.uniform(0.13, 0.2)),
        gap_frac=float(rng.uniform(0.08, 0.2)),
        margin_frac=float(rng.uniform(0.12, 0.3)),
        group_gap_at=int(rng.integers(2, n - 1)) if rng.random() < 0.35 else 0,
        plate_rgb=(int(plate[0]), int(plate[1]), int(plate[2])),
        ink_rgb=ink,
        border=bool(rng.random() < 0.5),
        shade=float(rng.uniform(-18, 18)),
    )


@lru_cache(maxsize=512)
def _glyph(ch: str, font: int, char_h: int, stroke: int) -> U8:
    """The ink of one character, ``char_h`` rows high, uint8 {0, 1} (cached; do not modify)."""
    base = cv2.getTextSize("0", font, 1.0, 1)[0][1]
    scale = max(0.2, (char_h - stroke) / max(base, 1))
    (tw, th), bl = cv2.getTextSize(ch, font, scale, stroke)
    pad = stroke + 4
    canvas = np.zeros((th + bl + 2 * pad, tw + 2 * pad), np.uint8)
    cv2.putText(canvas, ch, (pad, th + pad), font, scale, 1, stroke, cv2.LINE_8)
    rows, cols = np.flatnonzero(canvas.any(1)), np.flatnonzero(canvas.any(0))
    ink = canvas[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].astype(np.float32)
    w = max(1, int(round(ink.shape[1] * char_h / ink.shape[0])))
    out = (cv2.resize(ink, (w, char_h), interpolation=cv2.INTER_LINEAR) >= 0.5).astype(np.uint8)
    out.setflags(write=False)
    return out


@dataclass(frozen=True)
class PlateDrawing:
    """An upright plate: picture and per-character masks in canonical pixels.

    Attributes:
        image: ``(CANON_H, W, 3)`` uint8 RGB.
        char_masks: ``(K, CANON_H, W)`` uint8 {0, 1} glyph pixels, one per character, left to right.
        class_ids: ``(K,)`` int64 character classes.
    """

    image: U8
    char_masks: U8
    class_ids: npt.NDArray[np.int64]

    @property
    def size_wh(self) -> tuple[int, int]:
        """``(width, height)`` in canonical pixels."""
        return int(self.image.shape[1]), int(self.image.shape[0])


@lru_cache(maxsize=64)
def render_plate(style: PlateStyle) -> PlateDrawing:
    """Draw a plate upright at :data:`CANON_H` pixels high (cached per style; do not modify the arrays).

    Args:
        style: the plate.

    Returns:
        The :class:`PlateDrawing`.
    """
    hc = CANON_H
    char_h = int(round(style.char_h_frac * hc))
    stroke = max(2, int(round(style.stroke_frac * char_h)))
    glyphs = [_glyph(c, style.font, char_h, stroke) for c in style.text]
    gap = int(round(style.gap_frac * char_h))
    margin = int(round(style.margin_frac * hc))
    xs, x = [], margin
    for i, g in enumerate(glyphs):
        if i and i == style.group_gap_at:
            x += 2 * gap + int(0.25 * char_h)
        xs.append(x)
        x += g.shape[1] + gap
    wc = x - gap + margin
    top = (hc - char_h) // 2
    masks = np.zeros((len(glyphs), hc, wc), np.uint8)
    for k, (g, x0) in enumerate(zip(glyphs, xs, strict=True)):
        masks[k, top : top + char_h, x0 : x0 + g.shape[1]] = g
    ramp = np.linspace(-0.5, 0.5, wc, dtype=np.float32)[None, :, None] * style.shade
    img = np.clip(np.array(style.plate_rgb, np.float32)[None, None, :] + ramp, 0, 255)
    img = np.broadcast_to(img, (hc, wc, 3)).copy()
    ink = np.array(style.ink_rgb, np.float32)
    if style.border:
        t = max(2, hc // 28)
        inset = max(1, hc // 40)
        cv2.rectangle(img, (inset, inset), (wc - 1 - inset, hc - 1 - inset), tuple(float(v) for v in ink), t)
    img[masks.any(0)] = ink
    out = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    for a in (out, masks):
        a.setflags(write=False)
    return PlateDrawing(out, masks, style.class_ids)


@dataclass(frozen=True)
class PlatePose:
    """Where and how a plate lies on the target image.

    Attributes:
        center_xy: plate centre, target pixels.
        height_px: plate height (its left/right edges before the perspective terms), target pixels.
        yaw: horizontal perspective, -0.2..0.2: the left edge is ``1 + yaw`` times taller than
            the right one's ``1 - yaw`` (a plate turned about its vertical axis); the width also
            shrinks by ``sqrt(1 - 4 yaw^2)``.
        pitch: vertical perspective, -0.15..0.15: the top edge is ``1 - pitch`` and the bottom
            ``1 + pitch`` times the width.
        roll_deg: in-plane rotation, degrees counter-clockwise.
        squeeze: extra width factor (0.8..1.1) for plates seen at an angle.
    """

    center_xy: tuple[float, float]
    height_px: float
    yaw: float = 0.0
    pitch: float = 0.0
    roll_deg: float = 0.0
    squeeze: float = 1.0


def random_pose(rng: np.random.Generator, center_xy: tuple[float, float], height_px: float) -> PlatePose:
    """A random moderate perspective at a given place and size.

    Args:
        rng: random generator (consumed).
        center_xy: plate centre, target pixels.
        height_px: plate height, target pixels.

    Returns:
        The :class:`PlatePose`.
    """
    return PlatePose(center_xy, float(height_px), yaw=float(rng.uniform(-0.15, 0.15)),
                     pitch=float(rng.uniform(-0.08, 0.08)), roll_deg=float(rng.uniform(-7, 7)),
                     squeeze=float(rng.uniform(0.85, 1.05)))


def plate_quad(pose: PlatePose, size_wh: tuple[int, int]) -> F64:
    """Corners of the plate on the target (edge coordinates).

    Args:
        pose: the placement.
        size_wh: canonical plate size ``(width, height)``.

    Returns:
        ``(4, 2)`` float64 ``(x, y)``: top-left, top-right, bottom-right, bottom-left.
    """
    wc, hc = size_wh
    h = pose.height_px
    w = h * wc / hc * pose.squeeze * float(np.sqrt(max(0.0, 1 - 4 * pose.yaw**2)))
    q = np.array([[-w / 2, -h / 2], [w / 2, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]], dtype=np.float64)
    q[:, 1] *= 1 - pose.yaw * q[:, 0] / (w / 2)
    q[:, 0] *= 1 + pose.pitch * q[:, 1] / (h / 2)
    th = np.deg2rad(-pose.roll_deg)
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    return q @ rot.T + np.asarray(pose.center_xy, dtype=np.float64)


def plate_homography(pose: PlatePose, size_wh: tuple[int, int]) -> F64:
    """Homography from canonical plate edge coordinates to target edge coordinates (3x3 float64)."""
    wc, hc = size_wh
    src = np.array([[0, 0], [wc, 0], [wc, hc], [0, hc]], dtype=np.float32)
    return np.asarray(cv2.getPerspectiveTransform(src, plate_quad(pose, size_wh).astype(np.float32)), np.float64)


def plate_height_px(quad_xy: F64) -> float:
    """A plate's height on the target: the mean length of its left and right edges, pixels."""
    q = np.asarray(quad_xy, dtype=np.float64)
    return float((np.linalg.norm(q[3] - q[0]) + np.linalg.norm(q[2] - q[1])) / 2)


@dataclass(frozen=True)
class WarpedPlate:
    """A plate warped onto a window of the target (the window may reach outside the target).

    Attributes:
        window: ``(x0, y0, x1, y1)`` integer target pixels of the arrays below.
        image: ``(h, w, 3)`` float32 premultiplied colour (plate colour times its coverage).
        alpha: ``(h, w)`` float32 plate coverage in ``[0, 1]``.
        char_masks: ``(K, h, w)`` uint8 {0, 1}: characters covering at least half a pixel.
        plate_mask: ``(h, w)`` uint8 {0, 1}: plate coverage at least 0.5.
    """

    window: tuple[int, int, int, int]
    image: F32
    alpha: F32
    char_masks: U8
    plate_mask: U8


def _warp_stack(planes: F32, m_idx: F64, size_wh: tuple[int, int]) -> F32:
    """Warp ``(h, w, C)`` float32 planes (any C) by a pixel-index homography, 4 channels per call."""
    out = []
    for c0 in range(0, planes.shape[2], 4):
        part = np.ascontiguousarray(planes[:, :, c0 : c0 + 4])
        w = cv2.warpPerspective(part, m_idx, size_wh, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                                borderValue=0)
        out.append(w.reshape(size_wh[1], size_wh[0], -1))
    return np.concatenate(out, axis=2)


def warp_plate(drawing: PlateDrawing, homography: F64, *, with_image: bool = True,
               ss: int | None = None) -> WarpedPlate:
    """Warp a plate drawing onto its window of the target, supersampled ``ss`` times then area-averaged.

    Args:
        drawing: the upright plate.
        homography: canonical edge coordinates -> target edge coordinates (3x3).
        with_image: also warp the picture (False: masks only).
        ss: supersampling factor (default: about ``CANON_H / plate height``, 1 to 8).

    Returns:
        The :class:`WarpedPlate` (empty arrays when the plate is degenerate).
    """
    wc, hc = drawing.size_wh
    corners = np.array([[0, 0, 1], [wc, 0, 1], [wc, hc, 1], [0, hc, 1]], dtype=np.float64) @ homography.T
    quad = corners[:, :2] / corners[:, 2:3]
    x0, y0 = int(np.floor(quad[:, 0].min())), int(np.floor(quad[:, 1].min()))
    x1, y1 = int(np.ceil(quad[:, 0].max())), int(np.ceil(quad[:, 1].max()))
    k = drawing.char_masks.shape[0]
    if x1 <= x0 or y1 <= y0:
        z = np.zeros((0, 0), np.float32)
        return WarpedPlate((x0, y0, x0, y0), np.zeros((0, 0, 3), np.float32), z, np.zeros((k, 0, 0), np.uint8),
                           np.zeros((0, 0), np.uint8))
    if ss is None:
        ss = int(np.clip(round(hc / max(plate_height_px(quad), 1.0)), 1, 8))
    ww, wh = x1 - x0, y1 - y0
    t_src = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]], dtype=np.float64)  # index -> edge
    t_win = np.array([[ss, 0, -ss * x0 - 0.5], [0, ss, -ss * y0 - 0.5], [0, 0, 1]], dtype=np.float64)
    m_idx = t_win @ homography @ t_src
    planes = [drawing.char_masks.transpose(1, 2, 0).astype(np.float32), np.ones((hc, wc, 1), np.float32)]
    if with_image:
        planes.append(drawing.image.astype(np.float32))
    warped = _warp_stack(np.concatenate(planes, axis=2), m_idx, (ww * ss, wh * ss))
    if ss > 1:
        warped = cv2.resize(warped, (ww, wh), interpolation=cv2.INTER_AREA).reshape(wh, ww, -1)
    masks = (warped[:, :, :k] >= 0.5).transpose(2, 0, 1).astype(np.uint8)
    alpha = np.clip(warped[:, :, k], 0.0, 1.0)
    image = warped[:, :, k + 1 : k + 4] if with_image else np.zeros((wh, ww, 3), np.float32)
    return WarpedPlate((x0, y0, x1, y1), np.ascontiguousarray(image), np.ascontiguousarray(alpha), masks,
                       (alpha >= 0.5).astype(np.uint8))


def clip_window(window: tuple[int, int, int, int], size_wh: tuple[int, int]) -> tuple[slice, slice, slice, slice]:
    """Slices of a window's part inside a ``size_wh`` target: ``(target_rows, target_cols, win_rows, win_cols)``."""
    x0, y0, x1, y1 = window
    w, h = size_wh
    cx0, cy0, cx1, cy1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    if cx1 <= cx0 or cy1 <= cy0:
        e = slice(0, 0)
        return e, e, e, e
    return (slice(cy0, cy1), slice(cx0, cx1), slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0))


def composite(image: U8, warped: WarpedPlate, blur_sigma: float = 0.0) -> None:
    """Paint a warped plate over ``image`` in place (optionally defocused by a Gaussian blur).

    Args:
        image: ``(H, W, 3)`` uint8 RGB target, modified.
        warped: the plate.
        blur_sigma: blur of the plate's picture and edge, pixels (0: none).
    """
    h, w = image.shape[:2]
    tr, tc, wr, wcs = clip_window(warped.window, (w, h))
    if tr.stop - tr.start <= 0:
        return
    col, alpha = warped.image, warped.alpha
    if blur_sigma > 0:
        col = cv2.GaussianBlur(col, (0, 0), blur_sigma)
        alpha = cv2.GaussianBlur(alpha, (0, 0), blur_sigma)
    region = image[tr, tc].astype(np.float32)
    a = alpha[wr, wcs][..., None]
    image[tr, tc] = np.clip(region * (1 - a) + col[wr, wcs] + 0.5, 0, 255).astype(np.uint8)
