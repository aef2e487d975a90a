"""Normalising a letterboxed frame into a row of the engine's input tensor, on the host.

:class:`Normalizer` converts and scales; :class:`KeptPadding` remembers which tensor-slot rows
already hold a letterbox geometry's normalised padding, so that only the resized frame's window is
written again.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from streamdet.card import ModelCard
from streamdet.letterbox import LetterboxParams

Geometry = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
"""A letterbox's ``(input_wh, resized_wh, pad_xy)``: what decides which pixels of a row are padding."""


class Normalizer:
    """Writes a letterboxed HWC uint8 image (of the card's input size, or a smaller rectangle) into one CHW row.

    ``out[c] = (image[..., src(c)] - mean[c]) / std[c]`` where ``src`` maps the card's channel order
    onto the RGB frame (``BGR`` reverses it); mean and std are in the card's channel order.

    Args:
        card: the model card (input size, channel order, normalisation).
    """

    def __init__(self, card: ModelCard) -> None:
        self._planes: dict[tuple[int, int], list[npt.NDArray[np.uint8]]] = {}  # uint8 planes per input size
        self._order = [2, 1, 0] if card.input.channel_order == "BGR" else [0, 1, 2]
        mean = np.asarray(card.normalization.mean, dtype=np.float32)
        std = np.asarray(card.normalization.std, dtype=np.float32)
        if np.any(std == 0):
            raise ValueError(f"expected non-zero normalization std, got {card.normalization.std}")
        self._mean = [np.float32(m) for m in mean] if np.any(mean != 0) else None
        self._inv_std = [np.float32(1.0) / np.float32(v) for v in std]

    def __call__(self, image_hwc: npt.NDArray[np.uint8], out_chw: npt.NDArray[Any],
                 window: tuple[int, int, int, int] | None = None) -> None:
        """Normalise ``image_hwc`` ``(H, W, 3)`` uint8 RGB into ``out_chw`` ``(3, H, W)`` float32/16.

        With ``window`` ``(y0, y1, x0, x1)`` only those rows and columns are written (the rest of
        ``out_chw`` is left as it is: :class:`KeptPadding`).

        The image is split into contiguous uint8 planes (``cv2.split``) and each plane converted
        and scaled into its output plane in one pass (2.7x faster on 2 cores than converting the
        interleaved image to float first and writing it transposed; same float32 arithmetic).

        Raises:
            ValueError: on mismatched shapes.
        """
        if image_hwc.ndim != 3 or image_hwc.shape[2] != 3 or out_chw.shape != (3, *image_hwc.shape[:2]):
            raise ValueError(f"expected image (H, W, 3) and out (3, H, W), got {image_hwc.shape} and {out_chw.shape}")
        if window is not None:
            y0, y1, x0, x1 = window
            image_hwc, out_chw = image_hwc[y0:y1, x0:x1], out_chw[:, y0:y1, x0:x1]
        hw = (image_hwc.shape[0], image_hwc.shape[1])
        planes = self._planes.get(hw)
        if planes is None:
            planes = self._planes[hw] = [np.empty(hw, dtype=np.uint8) for _ in range(3)]
        cv2.split(np.ascontiguousarray(image_hwc), planes)
        for c, src in enumerate(self._order):
            if self._mean is None:
                np.multiply(planes[src], self._inv_std[c], out=out_chw[c], casting="unsafe")
            else:
                np.subtract(planes[src], self._mean[c], out=out_chw[c], casting="unsafe")
                np.multiply(out_chw[c], self._inv_std[c], out=out_chw[c], casting="unsafe")


class KeptPadding:
    """Which rows of the stage's tensor slots already hold the normalised padding of a letterbox geometry.

    The padding is constant, so a row last written with the same geometry (input size, resized
    size, offset) and the same slot layout still holds it: the next frame there only needs the
    resized frame's window letterboxed and normalised. For a 640x272 frame in 832x480 that skips
    126 of the 480 rows; 16:9 frames gain little (12 rows of 832x468 in 832x480). Valid because the
    preprocess stage alone writes its tensor slots and they live as long as it does; a slot viewed
    with another layout (another batch input size) forgets all its rows.
    """

    def __init__(self) -> None:
        self._slots: dict[int, tuple[tuple[int, int], dict[int, Geometry]]] = {}

    @staticmethod
    def geometry(params: LetterboxParams) -> Geometry:
        """The part of ``params`` that decides where the padding is."""
        return params.input_wh, params.resized_wh, params.pad_xy

    def window(self, slot: int, layout_wh: tuple[int, int], row: int,
               params: LetterboxParams) -> tuple[int, int, int, int] | None:
        """The ``(y0, y1, x0, x1)`` window still to write in ``row``, or None to write the whole row.

        Args:
            slot: the tensor slot (negative: not a pool slot, never kept).
            layout_wh: the slot's current view, the batch input size ``(width, height)``.
            row: the row in the batch.
            params: the frame's letterbox.
        """
        kept = self._slots.get(slot)
        if slot < 0 or kept is None or kept[0] != layout_wh or kept[1].get(row) != self.geometry(params):
            return None
        (rw, rh), (px, py) = params.resized_wh, params.pad_xy
        return py, py + rh, px, px + rw

    def wrote(self, slot: int, layout_wh: tuple[int, int], row: int, params: LetterboxParams) -> None:
        """Record that ``row`` of ``slot`` (viewed as ``layout_wh``) now holds a whole frame of ``params``."""
        if slot < 0:
            return
        kept = self._slots.get(slot)
        if kept is None or kept[0] != layout_wh:
            kept = self._slots[slot] = (layout_wh, {})
        kept[1][row] = self.geometry(params)
