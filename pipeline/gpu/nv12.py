"""YUV 4:2:0 frames (NV12 from NVDEC, I420 from software H.264 decode) to the model input, on the device.

A 1080p RGB24 frame is 6.2 MB; the same frame as YUV 4:2:0 is 3.1 MB, and software decoders
already produce it (``yuv420p``, planar: Y, then U, then V) and NVDEC downloads it (``nv12``: Y,
then U and V interleaved). Converting to RGB on the CPU costs about as much as the H.264 decode
itself (about 3.2 ms against 4.4 ms per 1080p frame on one core), so here the frame crosses to the
device as YUV (half the bytes) and the colour conversion runs there, followed by the ordinary
letterbox + normalize (:class:`~pipeline.gpu.gpu_preprocess.GpuLetterbox`).

Layout of one frame of ``H x W`` pixels (``H`` and ``W`` even), ``(H * 3 // 2, W)`` uint8 as
PyAV's ``frame.to_ndarray(format="yuv420p")`` / ``format="nv12"`` returns it:

* :attr:`YuvLayout.I420`: ``H*W`` bytes of Y, ``H*W/4`` of U (``H/2 x W/2``), ``H*W/4`` of V;
* :attr:`YuvLayout.NV12`: ``H*W`` bytes of Y, then ``H/2`` rows of ``W`` bytes ``U V U V ...``.

Colour: limited ("TV", Y 16..235, chroma 16..240) or full range, BT.601 or BT.709 matrix, chroma
upsampled by repetition (each chroma sample covers a 2x2 block, as OpenCV's
``COLOR_YUV2RGB_NV12`` / ``COLOR_YUV2RGB_I420`` and FFmpeg's unscaled ``yuv420p -> rgb24``
converter do), levels truncated as FFmpeg's converter does. Against PyAV's ``rgb24`` on real frames
(the CPU pipeline's input) at most 2 levels apart, mean 0.6-0.8; against OpenCV at most 4, mean 0.5.
FFmpeg (and so PyAV's ``to_ndarray(format="rgb24")``) uses BT.601 unless the
stream is tagged otherwise; :func:`yuv_matrix_for` picks the matrix from a PyAV frame's tags.
``tests/pipeline/test_gpu_nv12.py`` compares the result with PyAV's and OpenCV's conversions.

A frame of ``(H, W)`` packs into a ``(H // 2, W, 3)`` uint8 slot (the same byte count), so the
CUDA-IPC frame ring :class:`~pipeline.gpu.cuda_slotpool.CudaFramePool` carries YUV frames
unchanged (:func:`yuv420_slot_hw`, :func:`yuv_view`).

References: ITU-R BT.601-7 and BT.709-6 (``Kr``, ``Kb``; 8-bit quantisation ranges); OpenCV
``imgproc/src/color_yuv.simd.hpp``; FFmpeg ``libswscale/yuv2rgb.c``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

from streamdet.card import ModelCard
from streamdet.letterbox import LetterboxParams

if TYPE_CHECKING:
    import torch

    from pipeline.gpu.gpu_preprocess import GpuLetterbox


class YuvLayout(Enum):
    """How the two chroma planes of a 4:2:0 frame are stored after the luma plane."""

    I420 = "yuv420p"
    """Planar: all U, then all V (software H.264 decode)."""
    NV12 = "nv12"
    """Semi-planar: U and V interleaved (NVDEC)."""


class YuvMatrix(Enum):
    """The YUV -> RGB matrix."""

    BT601 = "bt601"
    """SD and FFmpeg's default for untagged streams (``Kr = 0.299``, ``Kb = 0.114``)."""
    BT709 = "bt709"
    """HD streams tagged BT.709 (``Kr = 0.2126``, ``Kb = 0.0722``)."""


_KR_KB = {YuvMatrix.BT601: (0.299, 0.114), YuvMatrix.BT709: (0.2126, 0.0722)}


@dataclass(frozen=True, slots=True)
class YuvCoefficients:
    """Float coefficients of ``R, G, B`` from ``Y, U, V`` (8-bit levels).

    ``R = y_scale * (Y - y_offset) + rv * (V - 128)``; ``G = y_scale * (Y - y_offset) + gu * (U - 128)
    + gv * (V - 128)``; ``B = y_scale * (Y - y_offset) + bu * (U - 128)``.
    """

    y_scale: float
    y_offset: float
    rv: float
    gu: float
    gv: float
    bu: float


def yuv_coefficients(matrix: YuvMatrix, *, full_range: bool = False) -> YuvCoefficients:
    """The conversion coefficients of a matrix and range (ITU-R BT.601 / BT.709, 8 bits).

    Args:
        matrix: BT.601 or BT.709.
        full_range: Y and chroma use 0..255 (JPEG range) instead of 16..235 / 16..240.

    Returns:
        The coefficients.
    """
    kr, kb = _KR_KB[matrix]
    kg = 1.0 - kr - kb
    ys, cs, yo = (1.0, 1.0, 0.0) if full_range else (255.0 / 219.0, 255.0 / 224.0, 16.0)
    return YuvCoefficients(y_scale=ys, y_offset=yo, rv=cs * 2.0 * (1.0 - kr),
                           gu=-cs * 2.0 * kb * (1.0 - kb) / kg, gv=-cs * 2.0 * kr * (1.0 - kr) / kg,
                           bu=cs * 2.0 * (1.0 - kb))


def yuv_matrix_for(frame: Any) -> tuple[YuvMatrix, bool]:
    """The matrix and range FFmpeg uses to convert a PyAV frame to RGB (BT.709 only when tagged so).

    Args:
        frame: an ``av.VideoFrame`` (its ``colorspace`` and ``color_range`` tags, FFmpeg's
            ``AVColorSpace`` and ``AVColorRange`` values).

    Returns:
        ``(matrix, full_range)``.
    """
    avcol_spc_bt709, avcol_range_jpeg = 1, 2
    matrix = YuvMatrix.BT709 if int(getattr(frame, "colorspace", 2) or 2) == avcol_spc_bt709 else YuvMatrix.BT601
    full = int(getattr(frame, "color_range", 0) or 0) == avcol_range_jpeg or "yuvj" in str(frame.format.name)
    return matrix, full


def yuv420_slot_hw(frame_hw: tuple[int, int]) -> tuple[int, int]:
    """The ``(height, width)`` of a :class:`~pipeline.gpu.cuda_slotpool.CudaFramePool` slot that holds one YUV frame.

    Args:
        frame_hw: the frame's ``(H, W)``, both even.

    Returns:
        ``(H // 2, W)``: a ``(H // 2, W, 3)`` uint8 slot has the frame's ``H * W * 3 / 2`` bytes.

    Raises:
        ValueError: on odd or non-positive sizes.
    """
    h, w = frame_hw
    if h < 2 or w < 2 or h % 2 or w % 2:
        raise ValueError(f"expected an even frame size, got {frame_hw}")
    return h // 2, w


def yuv_view(slot: torch.Tensor, frame_hw: tuple[int, int]) -> torch.Tensor:
    """View a ``(..., H // 2, W, 3)`` slot (or slots) as ``(..., H * 3 // 2, W)`` YUV frames (no copy)."""
    h, w = frame_hw
    return slot.reshape(*slot.shape[:-3], h * 3 // 2, w)


def yuv420_to_rgb(yuv: torch.Tensor, frame_hw: tuple[int, int], *, layout: YuvLayout, matrix: YuvMatrix,
                  full_range: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """Convert a batch of YUV 4:2:0 frames to RGB24 on their device.

    Args:
        yuv: ``(B, H * 3 // 2, W)`` uint8 (any device).
        frame_hw: ``(H, W)``, both even.
        layout: I420 or NV12.
        matrix: BT.601 or BT.709.
        full_range: 0..255 levels (``yuvj420p``) instead of limited range.
        out: ``(B, H, W, 3)`` uint8 on the same device to write into (else a new tensor).

    Returns:
        ``(B, H, W, 3)`` uint8 RGB (``out`` if given), truncated to whole levels (as FFmpeg's
        converter, which rounds down: rounding to nearest gave a mean difference of about 1.1 levels
        from PyAV's ``rgb24``, truncating about 0.6) and clamped.

    Raises:
        ValueError: on a shape, dtype or device mismatch.
    """
    import torch

    h, w = frame_hw
    yuv420_slot_hw(frame_hw)
    if yuv.ndim != 3 or tuple(yuv.shape[1:]) != (h * 3 // 2, w) or yuv.dtype != torch.uint8:
        raise ValueError(f"expected YUV frames as (B, {h * 3 // 2}, {w}) uint8, got {tuple(yuv.shape)} {yuv.dtype}")
    b = int(yuv.shape[0])
    if out is None:
        out = torch.empty((b, h, w, 3), dtype=torch.uint8, device=yuv.device)
    elif tuple(out.shape) != (b, h, w, 3) or out.dtype != torch.uint8 or out.device != yuv.device:
        raise ValueError(f"expected out as ({b}, {h}, {w}, 3) uint8 on {yuv.device}, got {tuple(out.shape)} "
                         f"{out.dtype} on {out.device}")
    c = yuv_coefficients(matrix, full_range=full_range)
    flat = yuv.reshape(b, -1)
    n_y, n_c = h * w, (h // 2) * (w // 2)
    if layout is YuvLayout.I420:
        u = flat[:, n_y : n_y + n_c].reshape(b, h // 2, w // 2)
        v = flat[:, n_y + n_c : n_y + 2 * n_c].reshape(b, h // 2, w // 2)
    else:
        uv = flat[:, n_y:].reshape(b, h // 2, w // 2, 2)
        u, v = uv[..., 0], uv[..., 1]
    y = flat[:, :n_y].reshape(b, h, w).float().sub_(c.y_offset).mul_(c.y_scale)
    uf = u.float().sub_(128.0)
    vf = v.float().sub_(128.0)

    def up(x: torch.Tensor) -> torch.Tensor:  # (B, H/2, W/2) -> (B, H, W), each sample over its 2x2 block
        return x[:, :, None, :, None].expand(b, h // 2, 2, w // 2, 2).reshape(b, h, w)

    for ch, chroma in enumerate((vf * c.rv, uf * c.gu + vf * c.gv, uf * c.bu)):
        out[..., ch] = (y + up(chroma)).floor_().clamp_(0.0, 255.0).to(torch.uint8)
    return out


class GpuYuvLetterbox:
    """YUV 4:2:0 frames -> RGB -> letterbox + normalize into the model-input batch, on one device.

    The colour conversion writes a preallocated ``(max_batch, H, W, 3)`` uint8 RGB buffer (the same
    bytes a host ``to_ndarray(format="rgb24")`` frame would have, up to the conversion's rounding),
    then :class:`~pipeline.gpu.gpu_preprocess.GpuLetterbox` letterboxes it as it does host frames.

    Args:
        card: the model card.
        max_batch: the largest batch.
        frame_hw: ``(H, W)`` of every frame (even sizes).
        layout: I420 or NV12.
        matrix: BT.601 or BT.709.
        full_range: full-range levels.
        device: ``"cuda"``, ``"cuda:N"`` or ``"cpu"``.

    Raises:
        ValueError: on bad sizes.
    """

    def __init__(self, *, card: ModelCard, max_batch: int, frame_hw: tuple[int, int], layout: YuvLayout,
                 matrix: YuvMatrix = YuvMatrix.BT601, full_range: bool = False,
                 device: str | torch.device = "cuda") -> None:
        import torch

        from pipeline.gpu.gpu_preprocess import GpuLetterbox

        yuv420_slot_hw(frame_hw)
        self.frame_hw = frame_hw
        self.layout, self.matrix, self.full_range = layout, matrix, full_range
        self.letterbox: GpuLetterbox = GpuLetterbox(card=card, max_batch=max_batch, device=device)
        self.device = self.letterbox.device
        self.max_batch = max_batch
        self.rgb = torch.empty((max_batch, frame_hw[0], frame_hw[1], 3), dtype=torch.uint8, device=self.device)

    def __call__(self, yuv: torch.Tensor | Sequence[torch.Tensor],
                 out: torch.Tensor | None = None) -> tuple[torch.Tensor, list[LetterboxParams]]:
        """Convert and letterbox a batch.

        Args:
            yuv: ``(B, H * 3 // 2, W)`` uint8, or ``B`` such frames ``(H * 3 // 2, W)``, on :attr:`device`.
            out: as :meth:`GpuLetterbox.__call__`'s ``out``.

        Returns:
            ``(batch, letterboxes)`` as :meth:`GpuLetterbox.__call__` (``batch`` is a view of its
            buffer, overwritten by the next call, unless ``out`` is given).

        Raises:
            ValueError: no frames, more than ``max_batch``, or frames of the wrong shape, dtype or device.
        """
        import torch

        frames = torch.stack(list(yuv)) if isinstance(yuv, Sequence) else yuv
        n = int(frames.shape[0]) if frames.ndim == 3 else 0
        if not 1 <= n <= self.max_batch:
            raise ValueError(f"expected 1..{self.max_batch} YUV frames, got {n}")
        if frames.device != self.device:
            raise ValueError(f"expected YUV frames on {self.device}, got {frames.device}")
        rgb = yuv420_to_rgb(frames, self.frame_hw, layout=self.layout, matrix=self.matrix,
                            full_range=self.full_range, out=self.rgb[:n])
        return self.letterbox(rgb, out=out)
