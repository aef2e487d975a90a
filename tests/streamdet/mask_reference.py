"""Brute-force instance-mask reference shared by test_masks and test_postprocess (not a test module)."""

from __future__ import annotations

import numpy as np

from streamdet.letterbox import LetterboxParams
from streamdet.masks import box_pixel_window

NM, MH, MW = 2, 8, 16  # prototypes: count, height, width


def make_protos() -> np.ndarray:
    """``(NM, MH, MW)`` float32 prototypes: a block (prototype 0) and a horizontal ramp (prototype 1)."""
    protos = np.full((NM, MH, MW), -10.0, np.float32)
    protos[0, 2:6, 4:12] = 10.0  # a block in proto pixels
    protos[1] = np.linspace(-5, 5, MW, dtype=np.float32)[None, :]  # a horizontal ramp
    return protos


def reference_frame_mask(
    logit_map: np.ndarray, box: tuple[float, ...], lb: LetterboxParams, thr_logit: float = 0.0
) -> np.ndarray:
    """Brute force: bilinear sample of the proto logits at each frame pixel centre, cut to the box."""
    fh, fw = lb.frame_hw
    mh, mw = logit_map.shape
    sx, sy = lb.scale_xy
    px, py = lb.pad_xy
    iw, ih = lb.input_wh
    ys, xs = np.mgrid[0:fh, 0:fw].astype(np.float64)
    u = ((xs + 0.5) * sx + px) * (mw / iw) - 0.5
    v = ((ys + 0.5) * sy + py) * (mh / ih) - 0.5
    u = np.clip(u, 0, mw - 1)
    v = np.clip(v, 0, mh - 1)
    u0 = np.minimum(np.floor(u).astype(int), mw - 2)
    v0 = np.minimum(np.floor(v).astype(int), mh - 2)
    fu, fv = u - u0, v - v0
    m = logit_map.astype(np.float64)
    val = (m[v0, u0] * (1 - fu) * (1 - fv) + m[v0, u0 + 1] * fu * (1 - fv) + m[v0 + 1, u0] * (1 - fu) * fv
           + m[v0 + 1, u0 + 1] * fu * fv)
    inside = np.zeros((fh, fw), bool)
    x0, y0, x1, y1 = box_pixel_window(box, (fh, fw))
    inside[y0:y1, x0:x1] = True
    return (val > thr_logit) & inside
