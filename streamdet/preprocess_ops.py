"""Model-input preprocessing shared by the runtime preprocess stage and the evaluator.

Frames are letterboxed (centred, the card's pad value; or stretched, as the card's ``input.resize``
says) into the model input, put in the card's channel order, normalised ``x = (pixel - mean) / std``
per channel and laid out NCHW in the card's dtype. Using this one function in the pipeline and in
``training.evaluate`` keeps the measured mAP equal to what the pipeline gets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from streamdet.card import ModelCard
from streamdet.letterbox import LetterboxParams, letterbox


def preprocess_batch(
    images_rgb: Sequence[npt.NDArray[np.uint8]],
    card: ModelCard,
    *,
    out: npt.NDArray[Any] | None = None,
) -> tuple[npt.NDArray[Any], list[LetterboxParams]]:
    """Letterbox and normalise RGB frames into one model input batch.

    Args:
        images_rgb: ``B`` frames, each ``(H, W, 3)`` uint8 RGB (sizes may differ).
        card: the model card (input size, channel order, normalization, pad value, dtype).
        out: optional ``(B, 3, ih, iw)`` buffer of the card's dtype to write into.

    Returns:
        ``(batch, letterboxes)``: ``(B, 3, ih, iw)`` array (float32 or float16 per the card), and
        each frame's :class:`~streamdet.letterbox.LetterboxParams`.

    Raises:
        ValueError: if there are no images, an image is not ``(H, W, 3)`` uint8, or ``out`` has the
            wrong shape or dtype.
    """
    n = len(images_rgb)
    if n == 0:
        raise ValueError("expected at least one image, got 0")
    iw, ih = card.input_wh
    dtype = np.dtype(card.input.dtype)
    if out is not None and (out.shape != (n, 3, ih, iw) or out.dtype != dtype):
        raise ValueError(f"expected out of shape {(n, 3, ih, iw)} {dtype}, got {out.shape} {out.dtype}")
    buf = np.empty((n, ih, iw, 3), dtype=np.uint8)
    params: list[LetterboxParams] = []
    for i, img in enumerate(images_rgb):
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"expected image {i} of shape (H, W, 3) uint8, got {img.shape} {img.dtype}")
        _, p = letterbox(img, (iw, ih), card.pad_value, out=buf[i], mode=card.input.resize)
        params.append(p)
    work = out if out is not None and dtype == np.float32 else np.empty((n, 3, ih, iw), dtype=np.float32)
    bgr = card.input.channel_order == "BGR"
    mean = card.normalization.mean
    std = card.normalization.std
    for c in range(3):
        src = buf[..., 2 - c if bgr else c]
        dst = work[:, c]
        if mean[c] != 0.0:
            np.subtract(src, np.float32(mean[c]), out=dst)
            np.multiply(dst, np.float32(1.0 / std[c]), out=dst)
        else:
            np.multiply(src, np.float32(1.0 / std[c]), out=dst)
    if dtype == np.float32:
        return work, params
    if out is not None:
        out[...] = work
        return out, params
    return work.astype(dtype), params
