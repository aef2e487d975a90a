"""The semantic trainer's data: letterboxed synthetic images and class maps in memory, and per-epoch crop plans.

Each frame of :class:`training.synth.SyntheticDataset` is letterboxed to the model input (pad 114;
its class map with nearest-neighbour interpolation and pad label 0); about half first go through
an H.264 round trip (:func:`training.augment.h264_roundtrip`, CRF 20..38). An epoch's shuffle,
crop and flip choices are drawn up front (:func:`plan_epoch`) so a resumed epoch can skip batches.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from tqdm import tqdm

from streamdet.constants import DEFAULT_INPUT_WH, PAD_VALUE
from streamdet.letterbox import LetterboxParams, letterbox, letterbox_labels
from training.augment import h264_roundtrip

H264_CRF_RANGE = (20, 38)

U8 = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class SemanticCache:
    """Letterboxed images and class maps held in memory.

    Attributes:
        images: ``(N, ih, iw, 3)`` uint8 RGB, letterboxed (pad 114).
        labels: ``(N, ih, iw)`` uint8 class maps, letterboxed (pad label 0).
        valid: ``(N, ih, iw)`` bool, True inside the letterboxed frame (False on the pad).
        h264_crf: ``(N,)`` int16 CRF of the H.264 round trip, -1 where none was applied.
    """

    images: U8
    labels: U8
    valid: npt.NDArray[np.bool_]
    h264_crf: npt.NDArray[np.int16]

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        if self.images.ndim != 4 or self.images.shape[3] != 3 or self.images.dtype != np.uint8:
            raise ValueError(f"expected (N, H, W, 3) uint8 images, got {self.images.shape} {self.images.dtype}")
        if self.labels.shape != self.images.shape[:3] or self.valid.shape != self.labels.shape:
            raise ValueError(f"expected labels and valid of shape {self.images.shape[:3]}, "
                             f"got {self.labels.shape} {self.valid.shape}")
        if self.h264_crf.shape != (n,):
            raise ValueError(f"expected ({n},) h264_crf, got {self.h264_crf.shape}")

    def __len__(self) -> int:
        return int(self.images.shape[0])


def valid_mask(params: LetterboxParams) -> npt.NDArray[np.bool_]:
    """``(ih, iw)`` bool mask of the letterboxed frame's pixels (False on the pad)."""
    iw, ih = params.input_wh
    (rw, rh), (px, py) = params.resized_wh, params.pad_xy
    m = np.zeros((ih, iw), dtype=bool)
    m[py : py + rh, px : px + rw] = True
    return m


def build_cache(
    *,
    seed: int,
    num_images: int,
    input_wh: tuple[int, int] = DEFAULT_INPUT_WH,
    h264_fraction: float = 0.5,
    desc: str = "cache",
) -> SemanticCache:
    """Render, augment and letterbox ``num_images`` synthetic samples into a :class:`SemanticCache`.

    Whether sample ``i`` gets the H.264 round trip, and at which CRF, is a pure function of
    ``(seed, i)``, so the cache is the same on every build.

    Args:
        seed: :class:`training.synth.SyntheticDataset` seed.
        num_images: number of samples.
        input_wh: model input size ``(width, height)``.
        h264_fraction: probability that a sample goes through
            :func:`training.augment.h264_roundtrip` (a one-frame clip, on the full frame before
            letterboxing, as in the pipeline).
        desc: progress-bar label.

    Returns:
        The cache.
    """
    from training.synth import SyntheticDataset

    ds = SyntheticDataset(seed=seed, num_images=num_images)
    iw, ih = input_wh
    images = np.empty((num_images, ih, iw, 3), np.uint8)
    labels = np.empty((num_images, ih, iw), np.uint8)
    valid = np.empty((num_images, ih, iw), bool)
    crfs = np.full(num_images, -1, np.int16)
    for i in tqdm(range(num_images), desc=desc, unit="img", leave=False, file=sys.stderr):
        sample = ds[i]
        rng = np.random.default_rng([seed, i, 264])
        image = sample.image
        if rng.random() < h264_fraction:
            crfs[i] = int(rng.integers(H264_CRF_RANGE[0], H264_CRF_RANGE[1] + 1))
            image = h264_roundtrip([image], crf=int(crfs[i]))[0]
        letterbox(image, input_wh, PAD_VALUE, out=images[i])
        labels[i], params = letterbox_labels(sample.semantic, input_wh)
        valid[i] = valid_mask(params)
    return SemanticCache(images=images, labels=labels, valid=valid, h264_crf=crfs)


@dataclass(frozen=True)
class EpochPlan:
    """The random choices of one epoch, drawn up front so a resumed epoch can skip its first batches.

    Attributes:
        order: ``(iters, batch)`` int64 sample indices.
        crop_xy: ``(iters, batch, 2)`` int64 top-left corners of the crops.
        flip: ``(iters, batch, 2)`` bool horizontal and vertical flips.
    """

    order: npt.NDArray[np.int64]
    crop_xy: npt.NDArray[np.int64]
    flip: npt.NDArray[np.bool_]


def plan_epoch(
    *, seed: int, epoch: int, num_images: int, batch: int, input_wh: tuple[int, int], crop_wh: tuple[int, int]
) -> EpochPlan:
    """Shuffle, crop and flip choices of an epoch, a pure function of the arguments (drops the last partial batch)."""
    rng = np.random.default_rng([seed, epoch, 7])
    iters = num_images // batch
    order = rng.permutation(num_images)[: iters * batch].reshape(iters, batch)
    x = rng.integers(0, input_wh[0] - crop_wh[0] + 1, size=(iters, batch))
    y = rng.integers(0, input_wh[1] - crop_wh[1] + 1, size=(iters, batch))
    flip = rng.random((iters, batch, 2)) < 0.5
    return EpochPlan(order=order, crop_xy=np.stack([x, y], axis=-1), flip=flip)


def make_batch(
    cache: SemanticCache, plan: EpochPlan, it: int, crop_wh: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``it`` of an epoch: ``(B, 3, ch, cw)`` float32 ``pixel / 255`` and ``(B, ch, cw)`` int64 labels."""
    cw, ch = crop_wh
    imgs, labs = [], []
    for j, idx in enumerate(plan.order[it]):
        x, y = plan.crop_xy[it, j]
        img = cache.images[idx, y : y + ch, x : x + cw]
        lab = cache.labels[idx, y : y + ch, x : x + cw]
        if plan.flip[it, j, 0]:
            img, lab = img[:, ::-1], lab[:, ::-1]
        if plan.flip[it, j, 1]:
            img, lab = img[::-1], lab[::-1]
        imgs.append(img)
        labs.append(lab)
    x_t = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float().div_(255.0).contiguous()
    y_t = torch.from_numpy(np.stack(labs).astype(np.int64))
    return x_t, y_t


