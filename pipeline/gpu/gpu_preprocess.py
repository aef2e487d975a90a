"""Letterbox + normalize on the GPU (torch), the device twin of :func:`streamdet.preprocess_ops.preprocess_batch`.

Frames arrive as ``(H, W, 3)`` uint8 RGB tensors on the device (a CUDA-IPC frame slot, see
:mod:`pipeline.gpu.cuda_slotpool`). Each batch is written into one preallocated ``(max_batch, 3,
ih, iw)`` tensor: the pad value is filled in, and the scaled frame goes into its region with
``F.interpolate(mode="bilinear", align_corners=False, antialias=False)``, which samples at the
same half-pixel centres as OpenCV's ``INTER_LINEAR`` (used by the CPU letterbox). The result is
rounded to whole pixel levels, halves up (as OpenCV's uint8 output is) before normalising
``x = (pixel - mean) / std``. OpenCV interpolates uint8 in fixed point (11-bit weights), so the
two differ by at most one pixel level (``1 / std`` after normalising) on a small fraction of
pixels; ``tests/pipeline/test_gpu_preprocess.py`` measures it against the CPU code.

Frames of one size are resized in one ``interpolate`` call; mixed sizes are done frame by frame.

References: OpenCV ``imgproc/src/resize.cpp`` (``INTER_LINEAR``: ``fx = (dx + 0.5) * scale - 0.5``);
PyTorch ``torch.nn.functional.interpolate`` (``align_corners=False``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from streamdet.card import ModelCard
from streamdet.letterbox import LetterboxParams, resize_params

if TYPE_CHECKING:
    import torch


class GpuLetterbox:
    """Letterbox and normalise device frames into a preallocated model-input batch.

    Args:
        card: the model card (input size, channel order, normalisation, pad value, dtype).
        max_batch: the largest batch (the buffer's leading size).
        device: where the frames and the batch live (``"cuda"``, ``"cuda:N"``; ``"cpu"`` in tests).

    Attributes:
        buffer: the ``(max_batch, 3, ih, iw)`` output tensor (float32 or float16 per the card).
    """

    def __init__(self, *, card: ModelCard, max_batch: int, device: str | torch.device = "cuda") -> None:
        import torch

        if max_batch < 1:
            raise ValueError(f"expected max_batch >= 1, got {max_batch}")
        self.card = card
        self.max_batch = max_batch
        self.device = torch.device(device)
        iw, ih = card.input_wh
        self.input_wh = (iw, ih)
        dtype = torch.float16 if card.input.dtype == "float16" else torch.float32
        self.buffer = torch.empty((max_batch, 3, ih, iw), dtype=dtype, device=self.device)
        mean = torch.tensor(card.normalization.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(card.normalization.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._mean = mean
        self._inv_std = 1.0 / std
        self._pad = ((float(card.pad_value) - mean) * self._inv_std).to(dtype)  # (1, 3, 1, 1)
        self._bgr = card.input.channel_order == "BGR"
        self._resize = card.input.resize  # letterbox or stretch, as the card says

    def __call__(self, frames_rgb: torch.Tensor | Sequence[torch.Tensor],
                 out: torch.Tensor | None = None) -> tuple[torch.Tensor, list[LetterboxParams]]:
        """Letterbox a batch.

        Args:
            frames_rgb: a ``(B, H, W, 3)`` uint8 tensor, or ``B`` tensors ``(H_i, W_i, 3)`` uint8, RGB,
                on :attr:`device`.
            out: where to write instead of :attr:`buffer`: ``(B, 3, ih, iw)`` of the buffer's dtype on
                :attr:`device` (e.g. rows of a shared device tensor slot).

        Returns:
            ``(batch, letterboxes)``: ``buffer[:B]`` (a view, overwritten by the next call) or ``out``,
            and each frame's :class:`~streamdet.letterbox.LetterboxParams`.

        Raises:
            ValueError: no frames, more than ``max_batch`` (without ``out``), a frame that is not
                ``(H, W, 3)`` uint8 on :attr:`device`, or an ``out`` of the wrong shape, dtype or device.
        """
        frames = list(frames_rgb.unbind(0)) if not isinstance(frames_rgb, Sequence) else list(frames_rgb)
        n = len(frames)
        if n == 0 or (n > self.max_batch and out is None):
            raise ValueError(f"expected 1..{self.max_batch} frames, got {n}")
        iw, ih = self.input_wh
        if out is not None and (tuple(out.shape) != (n, 3, ih, iw) or out.dtype != self.buffer.dtype
                                or out.device != self.device):
            raise ValueError(f"expected out as ({n}, 3, {ih}, {iw}) {self.buffer.dtype} on {self.device}, got "
                             f"{tuple(out.shape)} {out.dtype} on {out.device}")
        for i, f in enumerate(frames):
            if f.ndim != 3 or f.shape[2] != 3 or str(f.dtype) != "torch.uint8" or f.device != self.device:
                raise ValueError(f"expected frame {i} as (H, W, 3) uint8 on {self.device}, got "
                                 f"{tuple(f.shape)} {f.dtype} on {f.device}")
        if out is None:
            out = self.buffer[:n]
        params = [resize_params((int(f.shape[0]), int(f.shape[1])), self.input_wh, self._resize) for f in frames]
        same = all(f.shape == frames[0].shape for f in frames)
        if same:
            stacked = frames_rgb if not isinstance(frames_rgb, Sequence) else None
            self._fill(out, frames if stacked is None else [stacked], params[0])
        else:
            for i, (f, p) in enumerate(zip(frames, params, strict=True)):
                self._fill(out[i : i + 1], [f], p)
        return out, params

    def _fill(self, out: torch.Tensor, frames: list[torch.Tensor], p: LetterboxParams) -> None:
        """Write frames of one size (a list of ``(H, W, 3)``, or one ``(B, H, W, 3)``) into ``out``."""
        import torch
        import torch.nn.functional as F  # noqa: N812

        x = frames[0] if len(frames) == 1 and frames[0].ndim == 4 else torch.stack(frames)
        x = x.permute(0, 3, 1, 2)  # (B, 3, H, W) uint8 view
        if self._bgr:
            x = x.flip(1)
        (rw, rh), (px, py) = p.resized_wh, p.pad_xy
        iw, ih = self.input_wh
        xf = x.float()
        if (rw, rh) != (p.frame_hw[1], p.frame_hw[0]):
            xf = F.interpolate(xf, size=(rh, rw), mode="bilinear", align_corners=False, antialias=False)
            xf = xf.add_(0.5).floor_().clamp_(0.0, 255.0)  # whole levels, halves up, as OpenCV's uint8 result
        if (rw, rh) != (iw, ih):
            out[:, :, :py] = self._pad
            out[:, :, py + rh :] = self._pad
            out[:, :, py : py + rh, :px] = self._pad
            out[:, :, py : py + rh, px + rw :] = self._pad
        region = out[:, :, py : py + rh, px : px + rw]
        region.copy_((xf - self._mean) * self._inv_std)


def frames_to_device(frames_rgb: Sequence[Any], device: str | torch.device) -> list[torch.Tensor]:
    """Upload host ``(H, W, 3)`` uint8 numpy frames to ``device`` (tests and benchmarks).

    Returns:
        One uint8 tensor per frame.
    """
    import numpy as np
    import torch

    return [torch.from_numpy(np.ascontiguousarray(f)).to(device) for f in frames_rgb]
