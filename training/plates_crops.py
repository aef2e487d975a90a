"""Plate crops for the character segmenter, cut and letterboxed as the cascade does.

See :mod:`training.plates`. :func:`make_char_crop_sample` draws one vehicle with its plate on a
background patch (blur, noise, then an x264 or JPEG round trip), cuts the crop around the plate box
jittered by up to :data:`CROP_JITTER` of its size per edge and widened by :data:`CROP_PAD` per
side, and letterboxes it with :func:`streamdet.letterbox.letterbox` (pad 114). The character masks
are the glyphs warped straight onto the letterboxed crop's pixel grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
import numpy.typing as npt

from streamdet.constants import PAD_VALUE
from streamdet.letterbox import letterbox
from training.plates_render import clip_window, plate_homography, render_plate, warp_plate
from training.plates_scene import MAX_PLATE_PX, MIN_PLATE_PX, compose_vehicles, random_vehicle
from training.synth import Sample, background, mask_box_xyxy

CROP_PAD = 0.1
"""The cascade widens a detected plate box by this fraction of its width (height) on the left and
right (top and bottom) before cutting the crop. The pipeline's default must match."""
CROP_JITTER = 0.07
"""Each edge of the box a crop is cut around moves by up to this fraction of the box size (a
detector's localisation error), before :data:`CROP_PAD`."""
CHAR_INPUT_WH = (384, 96)
"""Default input ``(width, height)`` of the character segmenter."""

U8 = npt.NDArray[np.uint8]
F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class CharCropSample(Sample):
    """A letterboxed plate crop with its characters (class = index into :data:`CHAR_NAMES`).

    Attributes:
        text: the plate's text, left to right.
        plate_h_px: the plate's height in the frame it was cut from (before the letterbox), pixels.
        crop_xyxy: ``(4,)`` float32 the crop window in that frame's pixels (integers).
    """

    text: str = ""
    plate_h_px: float = 0.0
    crop_xyxy: F32 = field(default_factory=lambda: np.zeros(4, np.float32))


def crop_box_xyxy(box_xyxy: F32, pad: float = CROP_PAD, frame_wh: tuple[int, int] | None = None) -> F32:
    """The crop window the cascade cuts around a detected box: widened by ``pad``, rounded outwards, clipped.

    Args:
        box_xyxy: ``(4,)`` float32 detected box, frame pixels (edge coordinates).
        pad: fraction of the box width (height) added on the left and right (top and bottom).
        frame_wh: frame size to clip to (None: no clipping).

    Returns:
        ``(4,)`` float32 integer-valued window ``(x0, y0, x1, y1)``, frame pixels.
    """
    x0, y0, x1, y1 = (float(v) for v in box_xyxy)
    bw, bh = x1 - x0, y1 - y0
    out = np.array([np.floor(x0 - pad * bw), np.floor(y0 - pad * bh), np.ceil(x1 + pad * bw),
                    np.ceil(y1 + pad * bh)], dtype=np.float32)
    if frame_wh is not None:
        out = np.clip(out, 0, np.array([frame_wh[0], frame_wh[1]] * 2, np.float32))
    return out


def _degrade(patch: U8, rng: np.random.Generator) -> U8:
    """Sensor noise, then an x264 (I-frame), a JPEG or no round trip, as frames of a stream have."""
    sigma = float(rng.uniform(0, 6))
    if sigma > 0:
        patch = np.clip(patch.astype(np.float32) + rng.normal(0, sigma, patch.shape) + 0.5, 0, 255).astype(np.uint8)
    u = rng.random()
    if u < 0.35:
        from training.augment import h264_roundtrip

        h, w = patch.shape[:2]
        even = cv2.copyMakeBorder(patch, 0, h % 2, 0, w % 2, cv2.BORDER_REPLICATE)
        return h264_roundtrip([even], crf=int(rng.integers(20, 39)))[0][:h, :w].copy()
    if u < 0.7:
        ok, buf = cv2.imencode(".jpg", patch, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(25, 91))])
        if ok:
            return np.asarray(cv2.imdecode(buf, cv2.IMREAD_UNCHANGED), np.uint8)
    return patch


def make_char_crop_sample(seed: int, index: int, input_wh: tuple[int, int] = CHAR_INPUT_WH) -> CharCropSample:
    """The ``index``-th plate crop with seed ``seed``, letterboxed into ``input_wh``.

    Args:
        seed: dataset seed.
        index: crop index.
        input_wh: secondary-model input ``(width, height)``.

    Returns:
        The :class:`CharCropSample` (a pure function of the arguments): image ``(ih, iw, 3)``,
        character boxes, classes and masks in its pixels, the text and the plate's frame height.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, index, 0xC4A2]))
    ph = float(np.exp(rng.uniform(np.log(MIN_PLATE_PX), np.log(MAX_PLATE_PX))))
    pw_est = ph * 4.5
    pad_x, pad_y = int(0.6 * pw_est + 24), int(1.5 * ph + 24)
    pw_patch, ph_patch = min(1280, int(pw_est) + 2 * pad_x), min(720, int(ph * 1.6) + 2 * pad_y)
    frame = background(rng, (1280, 720))
    x0 = int(rng.integers(0, 1280 - pw_patch + 1))
    y0 = int(rng.integers(0, 720 - ph_patch + 1))
    patch = frame[y0 : y0 + ph_patch, x0 : x0 + pw_patch].copy()
    v = random_vehicle(rng, (pw_patch, ph_patch), height_px=ph, center_xy=(pw_patch / 2, ph_patch / 2), occlude=0.0)
    s = compose_vehicles(patch, [v], rng, noise_sigma=0.0, with_chars=False)
    image = _degrade(s.image, rng)
    box = s.boxes_xyxy[0].astype(np.float64)
    bw, bh = box[2] - box[0], box[3] - box[1]
    j = rng.uniform(-CROP_JITTER, CROP_JITTER, 4) * np.array([bw, bh, bw, bh])
    det = (box + j).astype(np.float32)
    crop = crop_box_xyxy(det, CROP_PAD, (pw_patch, ph_patch))
    cx0, cy0, cx1, cy1 = (int(c) for c in crop)
    lb_img, params = letterbox(np.ascontiguousarray(image[cy0:cy1, cx0:cx1]), input_wh, PAD_VALUE)
    # masks: the glyphs warped straight onto the letterboxed crop's pixel grid
    (sx, sy), (px, py) = params.scale_xy, params.pad_xy
    a = np.array([[sx, 0, px - sx * cx0], [0, sy, py - sy * cy0], [0, 0, 1]], dtype=np.float64)
    drawing = render_plate(v.style)
    wp = warp_plate(drawing, a @ plate_homography(v.pose, drawing.size_wh), with_image=False)
    iw, ih = input_wh
    tr, tc, wr, wcs = clip_window(wp.window, (iw, ih))
    content = np.zeros((ih, iw), np.uint8)
    content[py : py + params.resized_wh[1], px : px + params.resized_wh[0]] = 1
    boxes, classes, masks = [], [], []
    for k, cid in enumerate(v.style.class_ids.tolist()):
        m = np.zeros((ih, iw), np.uint8)
        m[tr, tc] = wp.char_masks[k][wr, wcs]
        m &= content
        b = mask_box_xyxy(m)
        if b is None:
            continue
        boxes.append(b)
        classes.append(cid)
        masks.append(m)
    n = len(boxes)
    mk = np.stack(masks) if n else np.zeros((0, ih, iw), np.uint8)
    semantic = np.zeros((ih, iw), np.uint8)
    for m, c in zip(masks, classes, strict=True):
        semantic[m > 0] = c + 1
    return CharCropSample(
        image=lb_img, boxes_xyxy=np.asarray(boxes, np.float32).reshape(n, 4),
        class_ids=np.asarray(classes, np.int64).reshape(n), masks=mk, semantic=semantic, ignore=np.zeros(n, bool),
        text=v.style.text, plate_h_px=float(s.plate_heights_px[0]),
        crop_xyxy=(crop + np.array([x0, y0, x0, y0], np.float32)).astype(np.float32),
    )



class CharCropDataset:
    """Deterministic, indexable letterboxed plate crops (interface of :class:`training.synth.SyntheticDataset`).

    Args:
        seed: dataset seed.
        num_images: number of crops.
        input_wh: secondary-model input ``(width, height)``.

    Raises:
        ValueError: on a negative ``num_images``.
    """

    def __init__(self, *, seed: int, num_images: int, input_wh: tuple[int, int] = CHAR_INPUT_WH) -> None:
        if num_images < 0:
            raise ValueError(f"expected num_images >= 0, got {num_images}")
        self.seed, self.num_images, self.input_wh = seed, num_images, input_wh

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> CharCropSample:
        if not 0 <= index < self.num_images:
            raise IndexError(f"expected index in [0, {self.num_images}), got {index}")
        return make_char_crop_sample(self.seed, index, self.input_wh)
