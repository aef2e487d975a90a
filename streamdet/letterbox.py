"""Letterbox resizing and its inverse.

A letterbox scales a frame by one factor that keeps its aspect ratio so it fits inside the model
input, then pads the rest with a constant value, centred. Postprocess undoes it with the same
:class:`LetterboxParams`, which ride along in every preprocess message. Some models (RT-DETR as
ultralytics trains it) expect the frame stretched to the input instead (:attr:`ResizeMode.STRETCH`):
the same :class:`LetterboxParams` describe that too (no padding, one scale per axis).

Reference: ultralytics ``data/augment.py`` ``LetterBox`` and torchvision
``models/detection/transform.py`` (``resize_boxes``, mapping boxes back to the original image).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import cv2
import numpy as np
import numpy.typing as npt

from streamdet.boxes import FloatArray
from streamdet.constants import PAD_VALUE


class ResizeMode(str, Enum):
    """How a frame is resized into the model input; the model card names the one its model expects.

    ``letterbox``: one scale that keeps the aspect ratio, centred, the rest padded (ultralytics
    ``LetterBox``, YOLO models). ``stretch``: each axis scaled to the input, no padding (ultralytics
    ``LetterBox(scale_fill=True)``, what its RT-DETR predictor and trainer use).
    """

    LETTERBOX = "letterbox"
    STRETCH = "stretch"


@dataclass(frozen=True, slots=True)
class LetterboxParams:
    """How one frame was letterboxed into the model input.

    Attributes:
        frame_hw: decoded frame size ``(height, width)`` in pixels.
        input_wh: model input size ``(width, height)`` in pixels.
        resized_wh: size ``(width, height)`` of the scaled frame inside the input, in pixels.
        pad_xy: left and top padding ``(pad_x, pad_y)`` in input pixels.
    """

    frame_hw: tuple[int, int]
    input_wh: tuple[int, int]
    resized_wh: tuple[int, int]
    pad_xy: tuple[int, int]

    def __post_init__(self) -> None:
        for name in ("frame_hw", "input_wh", "resized_wh"):
            a, b = getattr(self, name)
            if a <= 0 or b <= 0:
                raise ValueError(f"expected positive {name}, got {(a, b)}")
        px, py = self.pad_xy
        if px < 0 or py < 0:
            raise ValueError(f"expected non-negative pad_xy, got {self.pad_xy}")
        if self.resized_wh[0] + px > self.input_wh[0] or self.resized_wh[1] + py > self.input_wh[1]:
            raise ValueError(
                f"expected resized_wh + pad_xy inside input_wh {self.input_wh}, "
                f"got resized_wh={self.resized_wh} pad_xy={self.pad_xy}"
            )

    @property
    def scale_xy(self) -> tuple[float, float]:
        """Scale factors ``(sx, sy)`` from frame pixels to input pixels."""
        return (self.resized_wh[0] / self.frame_hw[1], self.resized_wh[1] / self.frame_hw[0])

    def to_list(self) -> list[int]:
        """Flat form ``[fh, fw, iw, ih, rw, rh, px, py]`` for message headers."""
        return [*self.frame_hw, *self.input_wh, *self.resized_wh, *self.pad_xy]

    @classmethod
    def from_list(cls, values: list[int] | tuple[int, ...]) -> LetterboxParams:
        """Inverse of :meth:`to_list`.

        Raises:
            ValueError: if ``values`` does not hold 8 integers.
        """
        if len(values) != 8:
            raise ValueError(f"expected 8 letterbox values, got {len(values)}")
        v = [int(x) for x in values]
        return cls((v[0], v[1]), (v[2], v[3]), (v[4], v[5]), (v[6], v[7]))


def letterbox_params(frame_hw: tuple[int, int], input_wh: tuple[int, int]) -> LetterboxParams:
    """Compute the letterbox that fits ``frame_hw`` into ``input_wh``, centred.

    Args:
        frame_hw: frame size ``(height, width)`` in pixels.
        input_wh: model input size ``(width, height)`` in pixels.

    Returns:
        The :class:`LetterboxParams`.

    Raises:
        ValueError: on non-positive sizes.
    """
    fh, fw = int(frame_hw[0]), int(frame_hw[1])
    iw, ih = int(input_wh[0]), int(input_wh[1])
    if fh <= 0 or fw <= 0 or iw <= 0 or ih <= 0:
        raise ValueError(f"expected positive sizes, got frame_hw={frame_hw} input_wh={input_wh}")
    r = min(iw / fw, ih / fh)
    rw = min(iw, max(1, int(round(fw * r))))
    rh = min(ih, max(1, int(round(fh * r))))
    return LetterboxParams((fh, fw), (iw, ih), (rw, rh), ((iw - rw) // 2, (ih - rh) // 2))


def stretch_params(frame_hw: tuple[int, int], input_wh: tuple[int, int]) -> LetterboxParams:
    """The resize that stretches ``frame_hw`` over all of ``input_wh`` (no padding, one scale per axis).

    Args:
        frame_hw: frame size ``(height, width)`` in pixels.
        input_wh: model input size ``(width, height)`` in pixels.

    Returns:
        :class:`LetterboxParams` with ``resized_wh == input_wh`` and ``pad_xy == (0, 0)``.

    Raises:
        ValueError: on non-positive sizes.
    """
    fh, fw = int(frame_hw[0]), int(frame_hw[1])
    iw, ih = int(input_wh[0]), int(input_wh[1])
    return LetterboxParams((fh, fw), (iw, ih), (iw, ih), (0, 0))


def resize_params(frame_hw: tuple[int, int], input_wh: tuple[int, int],
                  mode: ResizeMode = ResizeMode.LETTERBOX) -> LetterboxParams:
    """The resize of ``mode`` from ``frame_hw`` into ``input_wh``: :func:`letterbox_params` or :func:`stretch_params`.

    Raises:
        ValueError: on non-positive sizes.
    """
    if mode is ResizeMode.STRETCH:
        return stretch_params(frame_hw, input_wh)
    return letterbox_params(frame_hw, input_wh)


def rect_input_wh(frame_hw: tuple[int, int], input_wh: tuple[int, int], stride: int) -> tuple[int, int]:
    """The smallest input that holds the letterboxed frame, each side a multiple of ``stride`` away from the resize.

    For models with a dynamic spatial input: the frame is resized as into ``input_wh`` (same scale),
    and each padding is cut down to its remainder modulo ``stride``, so the input is the resized
    frame plus less than one stride of border per axis (640x272 into 640x640 with stride 32 gives
    640x288; 1280x720 gives 640x384). This is ultralytics' ``LetterBox(auto=True)`` (``minimum
    rectangle``, ``ultralytics/data/augment.py``), what its predictor uses for a dynamic export;
    :func:`letterbox_params` with the result centres the frame exactly as it does.

    Args:
        frame_hw: frame size ``(height, width)`` in pixels.
        input_wh: the model's nominal (largest) input ``(width, height)``.
        stride: the model's largest stride (32 for YOLO heads).

    Returns:
        ``(width, height)`` of the input, at most ``input_wh``.

    Raises:
        ValueError: on non-positive sizes or stride.
    """
    if stride <= 0:
        raise ValueError(f"expected a positive stride, got {stride}")
    p = letterbox_params(frame_hw, input_wh)
    (iw, ih), (rw, rh) = p.input_wh, p.resized_wh
    return rw + (iw - rw) % stride, rh + (ih - rh) % stride


def letterbox(
    image: npt.NDArray[np.uint8],
    input_wh: tuple[int, int],
    pad_value: int = PAD_VALUE,
    out: npt.NDArray[np.uint8] | None = None,
    mode: ResizeMode = ResizeMode.LETTERBOX,
) -> tuple[npt.NDArray[np.uint8], LetterboxParams]:
    """Letterbox (or, with ``mode`` ``stretch``, stretch) one HWC uint8 image into ``input_wh``.

    Args:
        image: ``(H, W, C)`` uint8 image (any channel order; it is kept).
        input_wh: target size ``(width, height)``.
        pad_value: constant for the padded border.
        out: optional ``(ih, iw, C)`` uint8 buffer to write into (avoids an allocation).
        mode: :class:`ResizeMode` (bilinear resize either way, as ultralytics' ``LetterBox``).

    Returns:
        The ``(ih, iw, C)`` uint8 letterboxed image and its :class:`LetterboxParams`.

    Raises:
        ValueError: if ``image`` is not a 3-D uint8 array or ``out`` has the wrong shape.
    """
    if image.ndim != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected (H, W, C) uint8 image, got shape {image.shape} dtype {image.dtype}")
    p = resize_params((image.shape[0], image.shape[1]), input_wh, mode)
    if out is None:
        out = np.empty((p.input_wh[1], p.input_wh[0], image.shape[2]), dtype=np.uint8)
    letterbox_into(image, out, p, pad_value=pad_value)
    return out, p


def letterbox_into(image: npt.NDArray[np.uint8], out: npt.NDArray[np.uint8], params: LetterboxParams, *,
                   pad_value: int = PAD_VALUE, fill_pad: bool = True) -> None:
    """:func:`letterbox` with the geometry already computed, into a given buffer.

    Args:
        image: ``(H, W, C)`` uint8 image.
        out: ``(ih, iw, C)`` uint8 buffer of ``params.input_wh``.
        params: ``resize_params`` of this image's size (the caller needed them first, e.g. to
            know which pixels of ``out`` are padding).
        pad_value: constant for the padded border.
        fill_pad: write the padding (False: ``out`` keeps what its border holds, e.g. when only
            the resized window is read afterwards).

    Raises:
        ValueError: if ``image`` is not a 3-D uint8 array or ``out`` has the wrong shape.
    """
    if image.ndim != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected (H, W, C) uint8 image, got shape {image.shape} dtype {image.dtype}")
    iw, ih = params.input_wh
    c = image.shape[2]
    if out.shape != (ih, iw, c) or out.dtype != np.uint8:
        raise ValueError(f"expected out of shape {(ih, iw, c)} uint8, got {out.shape} {out.dtype}")
    (rw, rh), (px, py) = params.resized_wh, params.pad_xy
    if fill_pad and ((rw, rh) != params.input_wh or px or py):
        out[:py] = pad_value
        out[py + rh :] = pad_value
        out[py : py + rh, :px] = pad_value
        out[py : py + rh, px + rw :] = pad_value
    _paste_resized(image, out, params, cv2.INTER_LINEAR)


def _paste_resized(src: npt.NDArray[np.uint8], out: npt.NDArray[np.uint8], p: LetterboxParams,
                   interpolation: int) -> None:
    """Resize ``src`` to ``p.resized_wh`` straight into its window of ``out`` (a copy if no resize)."""
    (rw, rh), (px, py) = p.resized_wh, p.pad_xy
    region = out[py : py + rh, px : px + rw]
    if (rw, rh) == (src.shape[1], src.shape[0]):
        region[...] = src
    else:
        cv2.resize(src, (rw, rh), dst=region, interpolation=interpolation)


def boxes_input_to_frame(boxes_xyxy: FloatArray, params: LetterboxParams, clip: bool = True) -> FloatArray:
    """Map boxes from model-input pixels back to decoded-frame pixels.

    Args:
        boxes_xyxy: ``(N, 4)`` float32 xyxy boxes in model-input pixels.
        params: the letterbox that produced the input.
        clip: clip the result to the frame.

    Returns:
        ``(N, 4)`` float32 xyxy boxes in frame pixels. A NaN coordinate stays NaN (clipping does
        not fix it): the postprocess decoders drop candidates whose box is not finite first.
    """
    sx, sy = params.scale_xy
    px, py = params.pad_xy
    out = np.empty((boxes_xyxy.shape[0], 4), dtype=np.float32)
    out[:, 0::2] = (boxes_xyxy[:, 0::2] - px) / sx
    out[:, 1::2] = (boxes_xyxy[:, 1::2] - py) / sy
    if clip:
        fh, fw = params.frame_hw
        np.clip(out[:, 0::2], 0.0, float(fw), out=out[:, 0::2])
        np.clip(out[:, 1::2], 0.0, float(fh), out=out[:, 1::2])
    return out


def boxes_frame_to_input(boxes_xyxy: FloatArray, params: LetterboxParams) -> FloatArray:
    """Map boxes from decoded-frame pixels to model-input pixels (inverse of :func:`boxes_input_to_frame`).

    Args:
        boxes_xyxy: ``(N, 4)`` float32 xyxy boxes in frame pixels.
        params: the letterbox applied to the frame.

    Returns:
        ``(N, 4)`` float32 xyxy boxes in model-input pixels.
    """
    sx, sy = params.scale_xy
    px, py = params.pad_xy
    out = np.empty((boxes_xyxy.shape[0], 4), dtype=np.float32)
    out[:, 0::2] = boxes_xyxy[:, 0::2] * sx + px
    out[:, 1::2] = boxes_xyxy[:, 1::2] * sy + py
    return out


def letterbox_labels(
    labels: npt.NDArray[np.uint8],
    input_wh: tuple[int, int],
    pad_label: int = 0,
) -> tuple[npt.NDArray[np.uint8], LetterboxParams]:
    """Letterbox a class map exactly like :func:`letterbox` does the image.

    Same geometry (:func:`letterbox_params`), but nearest-neighbour interpolation
    so no label is blended, and the border is filled with ``pad_label``.

    Args:
        labels: ``(H, W)`` uint8 class map.
        input_wh: target size ``(width, height)``.
        pad_label: class for the padded border (0 = background).

    Returns:
        The ``(ih, iw)`` uint8 letterboxed class map and its :class:`LetterboxParams`.

    Raises:
        ValueError: if ``labels`` is not a 2-D uint8 array.
    """
    if labels.ndim != 2 or labels.dtype != np.uint8:
        raise ValueError(f"expected (H, W) uint8 class map, got shape {labels.shape} dtype {labels.dtype}")
    p = letterbox_params((labels.shape[0], labels.shape[1]), input_wh)
    iw, ih = p.input_wh
    out = np.full((ih, iw), pad_label, dtype=np.uint8)
    _paste_resized(labels, out, p, cv2.INTER_NEAREST)
    return out, p
