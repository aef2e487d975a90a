"""Detector training data: letterboxed synthetic images cached in memory (and on disk), and batches.

:func:`build_cache` renders ``SyntheticDataset(seed, n)``, re-encodes a random fraction of the
1280x720 frames as H.264 (the artifacts of the videos the pipeline decodes, see
:func:`training.augment.h264_roundtrip`), letterboxes every frame to the model input
(:func:`streamdet.letterbox.letterbox`, pad 114), maps boxes with
:func:`streamdet.letterbox.boxes_frame_to_input` and, for instance segmentation, resizes the
instance masks to prototype resolution (input / 4). :func:`load_or_build_cache` stores the result
as ``.npy`` files keyed by every parameter. :class:`BatchLoader` yields augmented, padded batches.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import torch
from tqdm import tqdm

from streamdet.constants import DEFAULT_INPUT_WH, PAD_VALUE
from streamdet.letterbox import boxes_frame_to_input, letterbox, letterbox_params
from training.augment import NO_AUGMENT, AugmentConfig, augment_sample, h264_roundtrip
from training.loss import TargetBatch

U8 = npt.NDArray[np.uint8]
MASK_STRIDE = 4
CLIP_FRAMES = 8
"""Images re-encoded together as one H.264 clip (first an I-frame, the rest P-frames)."""
CACHE_VERSION = 1


@dataclass(frozen=True)
class CacheSpec:
    """What a cache holds; every field is part of its key.

    Attributes:
        seed: ``SyntheticDataset`` seed.
        num_images: number of images.
        input_wh: model input size ``(width, height)``.
        with_masks: store instance masks at ``input / 4``.
        h264_fraction: fraction of images re-encoded as H.264.
        crf_range: inclusive CRF range of the re-encoding.
        scene: what the images show (:data:`training.plates.SCENES`): ``shapes`` (the default, whose
            key has no scene part), ``plates`` (plate-scene frames), ``plate_chars`` (plate crops
            already letterboxed into ``input_wh``).
    """

    seed: int
    num_images: int
    input_wh: tuple[int, int] = DEFAULT_INPUT_WH
    with_masks: bool = False
    h264_fraction: float = 0.5
    crf_range: tuple[int, int] = (20, 38)
    scene: str = "shapes"

    def __post_init__(self) -> None:
        if self.num_images <= 0:
            raise ValueError(f"expected num_images > 0, got {self.num_images}")
        if not 0.0 <= self.h264_fraction <= 1.0:
            raise ValueError(f"expected h264_fraction in [0, 1], got {self.h264_fraction}")
        lo, hi = self.crf_range
        if not 0 <= lo <= hi <= 51:
            raise ValueError(f"expected 0 <= crf_range[0] <= crf_range[1] <= 51, got {self.crf_range}")
        if self.input_wh[0] % MASK_STRIDE or self.input_wh[1] % MASK_STRIDE:
            raise ValueError(f"expected input_wh divisible by {MASK_STRIDE}, got {self.input_wh}")

    def key(self) -> str:
        """Directory name of the cache."""
        w, h = self.input_wh
        return (f"synth-v{CACHE_VERSION}-s{self.seed}-n{self.num_images}-{w}x{h}-m{int(self.with_masks)}"
                f"-h{self.h264_fraction:g}-crf{self.crf_range[0]}_{self.crf_range[1]}"
                + ("" if self.scene == "shapes" else f"-{self.scene}"))


@dataclass(frozen=True)
class DetectionCache:
    """Letterboxed images and their objects.

    Attributes:
        spec: the :class:`CacheSpec`.
        images: ``(n, H, W, 3)`` uint8 RGB letterboxed images.
        boxes_xyxy: ``(T, 4)`` float32 boxes of all images, input pixels.
        class_ids: ``(T,)`` int64 class ids.
        ignore: ``(T,)`` bool, object mostly cut by the frame edge (COCO crowd in evaluation).
        offsets: ``(n + 1,)`` int64: image ``i`` owns objects ``offsets[i]:offsets[i + 1]``.
        masks: ``(T, H/4, W/4)`` uint8 {0,1} instance masks, or None.
        h264_crf: ``(n,)`` int16 CRF each image was re-encoded with, ``-1`` if not.
    """

    spec: CacheSpec
    images: U8
    boxes_xyxy: npt.NDArray[np.float32]
    class_ids: npt.NDArray[np.int64]
    ignore: npt.NDArray[np.bool_]
    offsets: npt.NDArray[np.int64]
    masks: U8 | None
    h264_crf: npt.NDArray[np.int16]

    def __post_init__(self) -> None:
        n = self.spec.num_images
        w, h = self.spec.input_wh
        if self.images.shape != (n, h, w, 3) or self.images.dtype != np.uint8:
            raise ValueError(f"expected images ({n}, {h}, {w}, 3) uint8, got {self.images.shape} {self.images.dtype}")
        if self.offsets.shape != (n + 1,):
            raise ValueError(f"expected offsets ({n + 1},), got {self.offsets.shape}")
        t = int(self.offsets[-1])
        if self.boxes_xyxy.shape != (t, 4) or self.class_ids.shape != (t,) or self.ignore.shape != (t,):
            raise ValueError(f"expected {t} objects, got boxes {self.boxes_xyxy.shape}, "
                             f"class_ids {self.class_ids.shape}, ignore {self.ignore.shape}")
        if self.masks is not None and self.masks.shape != (t, h // MASK_STRIDE, w // MASK_STRIDE):
            raise ValueError(f"expected masks ({t}, {h // MASK_STRIDE}, {w // MASK_STRIDE}), got {self.masks.shape}")

    def __len__(self) -> int:
        return self.spec.num_images

    def objects(self, i: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], U8 | None]:
        """Boxes ``(k, 4)``, class ids ``(k,)`` and masks ``(k, h, w)`` (or None) of image ``i`` (views)."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.boxes_xyxy[a:b], self.class_ids[a:b], None if self.masks is None else self.masks[a:b]


def masks_frame_to_input(masks: U8, frame_hw: tuple[int, int], input_wh: tuple[int, int],
                         stride: int = MASK_STRIDE) -> U8:
    """Letterbox instance masks to ``input / stride`` resolution (area interpolation, threshold 0.5).

    Args:
        masks: ``(N, H, W)`` uint8 {0,1} masks in frame pixels.
        frame_hw: frame size ``(H, W)``.
        input_wh: model input size ``(width, height)``.
        stride: downsampling of the result relative to the input.

    Returns:
        ``(N, ih / stride, iw / stride)`` uint8 {0,1} masks, letterboxed (pad 0).
    """
    mw, mh = input_wh[0] // stride, input_wh[1] // stride
    out = np.zeros((masks.shape[0], mh, mw), dtype=np.uint8)
    if masks.shape[0] == 0:
        return out
    p = letterbox_params(frame_hw, (mw, mh))
    (rw, rh), (px, py) = p.resized_wh, p.pad_xy
    for i in range(masks.shape[0]):  # cv2.resize handles up to 512 channels; per mask keeps it simple
        small = cv2.resize(masks[i].astype(np.float32), (rw, rh), interpolation=cv2.INTER_AREA)
        out[i, py : py + rh, px : px + rw] = small >= 0.5
    return out


def _render_block(spec: CacheSpec, start: int, stop: int) -> dict[str, Any]:
    """Render, re-encode and letterbox images ``start:stop`` (one H.264 clip at most)."""
    from training.plates import scene_dataset

    ds = scene_dataset(spec.scene, seed=spec.seed, num_images=spec.num_images, input_wh=spec.input_wh)
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, start, 0x264]))
    encode = rng.random(stop - start) < spec.h264_fraction
    crf = int(rng.integers(spec.crf_range[0], spec.crf_range[1] + 1))
    samples = [ds[i] for i in range(start, stop)]
    frames = [s.image for s in samples]
    sel = [j for j in range(len(samples)) if encode[j]]
    if sel:
        coded = h264_roundtrip([frames[j] for j in sel], crf=crf)
        for j, f in zip(sel, coded, strict=True):
            frames[j] = f
    iw, ih = spec.input_wh
    images = np.empty((stop - start, ih, iw, 3), dtype=np.uint8)
    boxes, classes, ignore, counts, masks = [], [], [], [], []
    for j, (s, f) in enumerate(zip(samples, frames, strict=True)):
        _, params = letterbox(f, spec.input_wh, PAD_VALUE, out=images[j])
        boxes.append(boxes_frame_to_input(s.boxes_xyxy, params))
        classes.append(s.class_ids.astype(np.int64))
        ignore.append(s.ignore.astype(bool))
        counts.append(s.boxes_xyxy.shape[0])
        if spec.with_masks:
            masks.append(masks_frame_to_input(s.masks, params.frame_hw, spec.input_wh))
    return {
        "images": images,
        "boxes": np.concatenate(boxes).astype(np.float32).reshape(-1, 4),
        "classes": np.concatenate(classes).astype(np.int64),
        "ignore": np.concatenate(ignore).astype(bool),
        "counts": np.asarray(counts, dtype=np.int64),
        "masks": np.concatenate(masks) if spec.with_masks else None,
        "crf": np.where(encode, crf, -1).astype(np.int16),
    }


def build_cache(spec: CacheSpec, *, workers: int = 1, progress: bool = True) -> DetectionCache:
    """Render the training images of ``spec`` (deterministic given the spec).

    Args:
        spec: the :class:`CacheSpec`.
        workers: worker processes (1: in this process).
        progress: show a tqdm bar.

    Returns:
        The :class:`DetectionCache`.
    """
    starts = list(range(0, spec.num_images, CLIP_FRAMES))
    blocks = [(s, min(s + CLIP_FRAMES, spec.num_images)) for s in starts]
    bar = tqdm(total=spec.num_images, desc=f"render {spec.key()}", disable=not progress, unit="img")
    parts: list[dict[str, Any]] = []
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers) as pool:
            for part in pool.starmap(_render_block, [(spec, a, b) for a, b in blocks], chunksize=1):
                parts.append(part)
                bar.update(part["images"].shape[0])
    else:
        for a, b in blocks:
            parts.append(_render_block(spec, a, b))
            bar.update(b - a)
    bar.close()
    counts = np.concatenate([p["counts"] for p in parts])
    return DetectionCache(
        spec=spec,
        images=np.concatenate([p["images"] for p in parts]),
        boxes_xyxy=np.concatenate([p["boxes"] for p in parts]).reshape(-1, 4),
        class_ids=np.concatenate([p["classes"] for p in parts]),
        ignore=np.concatenate([p["ignore"] for p in parts]),
        offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        masks=np.concatenate([p["masks"] for p in parts]) if spec.with_masks else None,
        h264_crf=np.concatenate([p["crf"] for p in parts]),
    )


_ARRAYS = ("images", "boxes_xyxy", "class_ids", "ignore", "offsets", "masks", "h264_crf")


def save_cache(cache: DetectionCache, directory: str | os.PathLike[str]) -> Path:
    """Write a cache as ``.npy`` files under ``directory / spec.key()`` (atomically, by renaming a temp dir).

    Returns:
        The cache's directory.
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    final = root / cache.spec.key()
    tmp = Path(tempfile.mkdtemp(prefix=cache.spec.key() + ".tmp", dir=root))
    try:
        for name in _ARRAYS:
            arr = getattr(cache, name)
            if arr is not None:
                np.save(tmp / f"{name}.npy", arr)
        spec = cache.spec
        meta = {"version": CACHE_VERSION, "seed": spec.seed, "num_images": spec.num_images,
                "input_wh": list(spec.input_wh), "with_masks": spec.with_masks,
                "h264_fraction": spec.h264_fraction, "crf_range": list(spec.crf_range)}
        if spec.scene != "shapes":
            meta["scene"] = spec.scene
        (tmp / "meta.json").write_text(json.dumps(meta))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_cache(spec: CacheSpec, directory: str | os.PathLike[str]) -> DetectionCache | None:
    """Load the cache of ``spec`` from ``directory`` (images memory-mapped), or None if absent or stale."""
    d = Path(directory) / spec.key()
    if not (d / "meta.json").is_file():
        return None
    try:
        arrays: dict[str, Any] = {}
        for name in _ARRAYS:
            f = d / f"{name}.npy"
            arrays[name] = np.load(f, mmap_mode="r" if name == "images" else None) if f.is_file() else None
        return DetectionCache(spec=spec, **arrays)
    except (OSError, ValueError):
        return None


def load_or_build_cache(
    spec: CacheSpec, cache_dir: str | os.PathLike[str] | None, *, workers: int = 1, progress: bool = True
) -> DetectionCache:
    """Load the cache of ``spec`` from ``cache_dir``, or build (and save, if ``cache_dir`` is given) it."""
    if cache_dir is not None:
        cached = load_cache(spec, cache_dir)
        if cached is not None:
            return cached
    cache = build_cache(spec, workers=workers, progress=progress)
    if cache_dir is not None:
        save_cache(cache, cache_dir)
    return cache


@dataclass(frozen=True)
class Batch:
    """One training batch.

    Attributes:
        images: ``(B, 3, H, W)`` float32 RGB in ``[0, 1]``.
        targets: the :class:`training.loss.TargetBatch` (boxes in input pixels).
        indices: ``(B,)`` cache indices of the images.
    """

    images: torch.Tensor
    targets: TargetBatch
    indices: npt.NDArray[np.int64]


def collate(
    images: list[U8],
    boxes: list[npt.NDArray[np.float32]],
    classes: list[npt.NDArray[np.int64]],
    masks: list[U8] | None,
    indices: npt.NDArray[np.int64],
) -> Batch:
    """Stack images and pad per-image objects to the batch's largest count.

    Args:
        images: ``B`` arrays ``(H, W, 3)`` uint8 RGB.
        boxes: ``B`` arrays ``(k_i, 4)`` float32 xyxy, input pixels.
        classes: ``B`` arrays ``(k_i,)`` int64.
        masks: ``B`` arrays ``(k_i, h, w)`` uint8, or None.
        indices: ``(B,)`` cache indices.

    Returns:
        The :class:`Batch`.
    """
    b = len(images)
    m = max([x.shape[0] for x in boxes] + [0])
    bx = np.zeros((b, m, 4), dtype=np.float32)
    cl = np.zeros((b, m), dtype=np.int64)
    valid = np.zeros((b, m), dtype=bool)
    mk = None
    if masks is not None:
        mh, mw = images[0].shape[0] // MASK_STRIDE, images[0].shape[1] // MASK_STRIDE
        mk = np.zeros((b, m, mh, mw), dtype=np.uint8)
    for i in range(b):
        k = boxes[i].shape[0]
        bx[i, :k], cl[i, :k], valid[i, :k] = boxes[i], classes[i], True
        if mk is not None and masks is not None:
            mk[i, :k] = masks[i]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255.0)
    tgt = TargetBatch(torch.from_numpy(bx), torch.from_numpy(cl), torch.from_numpy(valid),
                      None if mk is None else torch.from_numpy(mk))
    return Batch(images=x.contiguous(), targets=tgt, indices=indices)


class BatchLoader:
    """Shuffled, augmented batches from a :class:`DetectionCache`, prepared one batch ahead in a thread.

    Every batch's randomness comes from ``(seed, epoch, batch index)``, so an epoch is
    reproducible (and a resumed run sees the same batches).

    Args:
        cache: the images.
        batch_size: images per batch.
        augment: :class:`training.augment.AugmentConfig` (``NO_AUGMENT`` for validation).
        seed: loader seed.
        shuffle: shuffle per epoch.
        drop_last: drop a last incomplete batch.
        with_masks: include instance masks (the cache must have them).
    """

    def __init__(
        self,
        *,
        cache: DetectionCache,
        batch_size: int,
        augment: AugmentConfig = NO_AUGMENT,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        with_masks: bool = False,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"expected batch_size > 0, got {batch_size}")
        if with_masks and cache.masks is None:
            raise ValueError("expected a cache with instance masks for with_masks=True, got none")
        self.cache, self.batch_size, self.augment = cache, batch_size, augment
        self.seed, self.shuffle, self.drop_last, self.with_masks = seed, shuffle, drop_last, with_masks

    def __len__(self) -> int:
        n = len(self.cache)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _order(self, epoch: int) -> npt.NDArray[np.int64]:
        n = len(self.cache)
        if not self.shuffle:
            return np.arange(n, dtype=np.int64)
        return np.random.default_rng(np.random.SeedSequence([self.seed, epoch])).permutation(n).astype(np.int64)

    def make_batch(self, epoch: int, index: int) -> Batch:
        """Batch ``index`` of epoch ``epoch``."""
        order = self._order(epoch)
        idx = order[index * self.batch_size : (index + 1) * self.batch_size]
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, index, 1]))
        images, boxes, classes, masks = [], [], [], []
        for i in idx.tolist():
            b, c, m = self.cache.objects(i)
            img, b2, c2, m2 = augment_sample(np.asarray(self.cache.images[i]), b, c,
                                             m if self.with_masks else None, rng, self.augment)
            images.append(img)
            boxes.append(b2)
            classes.append(c2)
            if m2 is not None:
                masks.append(m2)
        return collate(images, boxes, classes, masks if self.with_masks else None, idx)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """Yield the batches of ``epoch`` from batch ``start`` on (the next is built while one is used)."""
        n = len(self)
        if start >= n:
            return
        with ThreadPoolExecutor(max_workers=1) as ex:
            fut = ex.submit(self.make_batch, epoch, start)
            for i in range(start, n):
                batch = fut.result()
                if i + 1 < n:
                    fut = ex.submit(self.make_batch, epoch, i + 1)
                yield batch
