"""Train the semantic segmenter (:class:`training.semantic_model.SemanticNet`) on synthetic data.

The training and validation sets are built once, in memory, from
:class:`training.synth.SyntheticDataset` (validation from a different seed): each frame is letterboxed
to the model input (pad 114; its class map with nearest-neighbour interpolation and pad label 0),
and about half of the frames first go through an H.264 encode/decode round trip
(:func:`training.augment.h264_roundtrip`: libx264, yuv420p, CRF 20..38) so the model sees the block
and ringing artifacts of the videos it will run on.

Each iteration takes a batch of random crops (random horizontal and vertical flips: every class is
mirror-symmetric) and minimises cross-entropy plus a soft Dice loss with AdamW and a cosine learning
rate (linear warm-up). After each epoch it computes the validation mIoU (numpy confusion matrix over
the non-padded pixels) and writes ``RUN_DIR/last.pt``, ``RUN_DIR/best.pt`` (highest validation
mIoU) and a line of ``RUN_DIR/results.jsonl``. ``--resume`` continues from ``RUN_DIR/last.pt``.

Usage::

    python -m training.train_semantic --out runs/semantic --images 2000 --epochs 40 --threads 2

References: Milletari et al., "V-Net" (2016) for the soft Dice loss; Loshchilov & Hutter,
"SGDR" (2017) for the cosine schedule, "Decoupled Weight Decay Regularization" (2019) for AdamW.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from tqdm import tqdm

from streamdet.constants import PAD_VALUE
from streamdet.letterbox import LetterboxParams, letterbox
from training.augment import h264_roundtrip
from training.semantic_model import (
    DEFAULT_INPUT_WH,
    PanFcnConfig,
    SemanticArch,
    SemanticConfig,
    SemanticNetConfig,
    build_semantic_model,
    count_parameters,
    letterbox_labels,
    semantic_config_from_dict,
)

TASK = "semantic"
VAL_SEED_OFFSET = 100_000
"""The validation set uses ``seed + VAL_SEED_OFFSET`` (a different seed from the training set)."""
H264_CRF_RANGE = (20, 38)
WARMUP_ITERS = 200

U8 = npt.NDArray[np.uint8]


class TrainError(Exception):
    """A training run cannot start or continue (bad arguments, missing or bad checkpoint)."""


def semantic_class_names() -> tuple[str, ...]:
    """``("background", *CLASS_NAMES)``: the semantic model's class names, index = class id."""
    from training.synth import CLASS_NAMES

    return ("background", *CLASS_NAMES)


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


def confusion_matrix(
    pred: npt.NDArray[np.integer[Any]],
    target: npt.NDArray[np.integer[Any]],
    num_classes: int,
    valid: npt.NDArray[np.bool_] | None = None,
) -> npt.NDArray[np.int64]:
    """Pixel confusion matrix.

    Args:
        pred: predicted class ids, any shape.
        target: true class ids, same shape, values in ``[0, num_classes)``.
        num_classes: ``C``.
        valid: optional bool mask of the pixels to count, same shape.

    Returns:
        ``(C, C)`` int64, ``[true, predicted]`` pixel counts.

    Raises:
        ValueError: on mismatched shapes.
    """
    if pred.shape != target.shape or (valid is not None and valid.shape != target.shape):
        raise ValueError(f"expected equal shapes, got pred {pred.shape} target {target.shape} "
                         f"valid {None if valid is None else valid.shape}")
    t = target.astype(np.int64).ravel()
    p = pred.astype(np.int64).ravel()
    if valid is not None:
        keep = valid.ravel()
        t, p = t[keep], p[keep]
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_per_class(confusion: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    """Per-class IoU ``TP / (TP + FP + FN)`` from a confusion matrix; NaN where a class is in neither.

    Args:
        confusion: ``(C, C)`` ``[true, predicted]`` counts.

    Returns:
        ``(C,)`` float64.
    """
    tp = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.maximum(union, 1), np.nan)


def mean_iou(confusion: npt.NDArray[np.int64]) -> float:
    """mIoU: mean of :func:`iou_per_class` over the classes present (background included)."""
    iou = iou_per_class(confusion)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Multi-class soft Dice loss, ``1 - mean_c (2 |P_c T_c| + eps) / (|P_c| + |T_c| + eps)``.

    Sums run over the batch and pixels; ``P`` is the softmax, ``T`` the one-hot target.

    Args:
        logits: ``(B, C, H, W)`` float logits.
        target: ``(B, H, W)`` int64 class ids.
        eps: smoothing (keeps classes absent from the batch near zero loss).

    Returns:
        Scalar tensor.
    """
    c = logits.shape[1]
    prob = logits.softmax(dim=1)
    onehot = F.one_hot(target, c).permute(0, 3, 1, 2).to(prob.dtype)
    inter = (prob * onehot).sum(dim=(0, 2, 3))
    denom = prob.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    return 1.0 - ((2.0 * inter + eps) / (denom + eps)).mean()


def lr_at(iteration: int, total: int, base_lr: float, warmup: int = WARMUP_ITERS, final_frac: float = 0.02) -> float:
    """Learning rate: linear warm-up over ``warmup`` iterations, then cosine decay to ``final_frac * base_lr``.

    Args:
        iteration: 0-based iteration.
        total: total iterations of the schedule.
        base_lr: peak learning rate.
        warmup: warm-up iterations (shortened to a tenth of ``total`` for short runs).
        final_frac: final learning rate as a fraction of ``base_lr``.

    Returns:
        The learning rate.
    """
    warmup = min(warmup, max(1, total // 10))
    if iteration < warmup:
        return base_lr * (iteration + 1) / warmup
    t = min(1.0, (iteration - warmup) / max(1, total - warmup))
    return base_lr * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * t)))


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


@torch.no_grad()
def evaluate_cache(
    model: torch.nn.Module, cache: SemanticCache, num_classes: int, batch: int = 8
) -> npt.NDArray[np.int64]:
    """Confusion matrix of ``model`` on a cache (full letterboxed inputs, pad pixels excluded).

    Args:
        model: the model (put in eval mode; its mode is restored).
        cache: validation cache.
        num_classes: ``C``.
        batch: inference batch size.

    Returns:
        ``(C, C)`` int64 ``[true, predicted]`` counts.
    """
    was_training = model.training
    model.eval()
    cm = np.zeros((num_classes, num_classes), np.int64)
    for s in range(0, len(cache), batch):
        x = torch.from_numpy(cache.images[s : s + batch]).permute(0, 3, 1, 2).float().div_(255.0)
        pred = model(x).argmax(dim=1).numpy()
        cm += confusion_matrix(pred, cache.labels[s : s + batch], num_classes, cache.valid[s : s + batch])
    model.train(was_training)
    return cm


def _parse_wh(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}") from e
    if w <= 0 or h <= 0:
        raise argparse.ArgumentTypeError(f"expected positive WIDTHxHEIGHT, got {text!r}")
    return (w, h)


def _parse_widths(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (flags shared with ``training.train``, plus semantic-only ones)."""
    p = argparse.ArgumentParser(prog="python -m training.train_semantic", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="run directory (checkpoints, results.jsonl)")
    p.add_argument("--images", type=int, default=2000, help="training images (SyntheticDataset size)")
    p.add_argument("--val-images", type=int, default=200, help=f"validation images (seed + {VAL_SEED_OFFSET})")
    p.add_argument("--seed", type=int, default=0, help="training-set and initialisation seed")
    p.add_argument("--epochs", type=int, default=40, help="passes over the training images")
    p.add_argument("--batch", type=int, default=8, help="crops per iteration")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt with its saved settings")
    p.add_argument("--max-iters", type=int, default=0, help="stop after this many iterations in all (0: no limit)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--crop", type=_parse_wh, default=(384, 256), help="training crop WIDTHxHEIGHT of the input")
    p.add_argument("--input", type=_parse_wh, default=DEFAULT_INPUT_WH, help="model input WIDTHxHEIGHT")
    p.add_argument("--arch", choices=[a.value for a in SemanticArch], default=SemanticArch.UNET.value,
                   help="unet: the plain U-Net from random weights; pan_fcn: the detector's backbone and FPN "
                        "with an FCN head (initialise it with --init DETECTOR_CHECKPOINT)")
    p.add_argument("--init", default=None,
                   help="pan_fcn: initialise the backbone and FPN from this detector checkpoint "
                        "(training.train --task detect); its widths and depths are taken")
    p.add_argument("--widths", type=_parse_widths, default=SemanticNetConfig().widths,
                   help="unet: encoder stage widths (strides 2, 4, ...)")
    p.add_argument("--dice", type=float, default=0.5, help="weight of the soft Dice loss (0: cross-entropy only)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--h264-fraction", type=float, default=0.5, help="fraction of images with H.264 artifacts")
    p.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                   help="bfloat16 autocast for the forward pass (auto: where the CPU has native bf16)")
    return p


# settings that a resumed run takes from its checkpoint, not from the command line
_RESUMED_KEYS = ("images", "val_images", "seed", "batch", "lr", "crop", "input", "widths", "dice",
                 "weight_decay", "h264_fraction", "arch", "init")


def _check_args(a: argparse.Namespace) -> None:
    if a.images < a.batch or a.batch < 1:
        raise TrainError(f"expected --batch >= 1 and --images >= --batch, got --images {a.images} --batch {a.batch}")
    if a.val_images < 1 or a.epochs < 1 or a.lr <= 0 or a.threads < 1 or a.max_iters < 0:
        raise TrainError("expected --val-images, --epochs, --threads >= 1, --lr > 0, --max-iters >= 0")
    if a.crop[0] > a.input[0] or a.crop[1] > a.input[1]:
        raise TrainError(f"expected --crop inside --input {a.input}, got {a.crop}")
    if not 0.0 <= a.h264_fraction <= 1.0:
        raise TrainError(f"expected --h264-fraction in [0, 1], got {a.h264_fraction}")
    if a.init and a.arch != SemanticArch.PAN_FCN.value:
        raise TrainError(f"--init: expected --arch {SemanticArch.PAN_FCN.value} (the U-Net has no detector backbone)")


def detector_init(path: str | os.PathLike[str], num_classes: int, input_wh: tuple[int, int]) -> tuple[
        PanFcnConfig, dict[str, torch.Tensor]]:
    """The :class:`PanFcnConfig` and ``body.``-prefixed weights taken from a detector checkpoint.

    Args:
        path: a ``training.train --task detect|segment`` checkpoint (``best.pt`` / ``last.pt``).
        num_classes: semantic classes ``C``.
        input_wh: model input size ``(width, height)``.

    Returns:
        ``(config, state)``: the detector's widths and depths in a config, and its backbone and
        top-down FPN weights keyed as :class:`training.semantic_model.PanFcnNet` names them.

    Raises:
        TrainError: if the file is not a detector checkpoint (the message names it).
    """
    p = Path(path)
    if not p.is_file() or not zipfile.is_zipfile(p):
        raise TrainError(f"{p}: not a torch checkpoint")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=False)  # our own training checkpoints
        det = dict(ckpt["model_config"])
        state = ckpt["model"]
        config = PanFcnConfig(num_classes=num_classes, input_wh=input_wh, width=tuple(det["width"]),
                              width_mult=float(det["width_mult"]), depth=tuple(det["depth"]),
                              depth_mult=float(det["depth_mult"]))
    except Exception as e:  # torch.load raises many unpickling error types; KeyError/TypeError on other files
        raise TrainError(f"{p}: not a detector checkpoint ({type(e).__name__}: {str(e)[:200]})") from e
    return config, {f"body.{k}": v for k, v in state.items()}


def _save(obj: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a semantic checkpoint (``weights_only``: plain types and tensors) and check its kind.

    Args:
        path: ``last.pt`` or ``best.pt``.

    Returns:
        The checkpoint dict.

    Raises:
        TrainError: if the file is missing, not a torch checkpoint, or not a semantic checkpoint (the
            message names the file).
    """
    p = Path(path)
    if not p.is_file():
        raise TrainError(f"{p}: checkpoint not found")
    if not zipfile.is_zipfile(p):
        raise TrainError(f"{p}: not a torch checkpoint (not a torch.save zip archive)")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several unpickling / zip errors
        lines = [ln.strip() for ln in str(e).strip().splitlines()] or [type(e).__name__]
        why = next((ln.split("Unpickler error:")[-1].strip() for ln in lines if "Unpickler error:" in ln), lines[0])
        raise TrainError(f"{p}: not a readable torch checkpoint ({why[:200]})") from e
    if not isinstance(ckpt, dict) or ckpt.get("task") != TASK:
        task = ckpt.get("task") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise TrainError(f"{p}: expected a checkpoint with task {TASK!r}, got {task!r}")
    for key in ("model", "model_config", "class_names", "input_wh"):
        if key not in ckpt:
            raise TrainError(f"{p}: checkpoint has no {key!r}")
    return ckpt


def main(argv: list[str] | None = None) -> int:
    """Train; see the module docstring.

    Args:
        argv: command-line arguments (without the program name); ``sys.argv[1:]`` when None.

    Returns:
        0 on success, 1 on a bad input (one ``error:`` line on stderr).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return _train(args, argv)
    except TrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        return 1


def _train(args: argparse.Namespace, argv: list[str]) -> int:
    out = Path(args.out)
    ckpt: dict[str, Any] | None = None
    if args.resume:
        ckpt = load_checkpoint(out / "last.pt")
        saved = ckpt.get("args", {})
        for key in _RESUMED_KEYS:
            if key in saved:
                v = saved[key]
                setattr(args, key, tuple(v) if isinstance(v, list) else v)
    _check_args(args)
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise TrainError(f"{out}: run directory is not writable")

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(1)
    torch.manual_seed(args.seed)
    class_names = semantic_class_names()
    config: SemanticConfig
    init_state: dict[str, torch.Tensor] = {}
    if ckpt is not None:
        try:
            config = semantic_config_from_dict(dict(ckpt["model_config"]))
        except (TypeError, ValueError) as e:
            raise TrainError(f"{out / 'last.pt'}: bad model config ({e})") from e
    elif args.arch == SemanticArch.PAN_FCN.value:
        if args.init:
            config, init_state = detector_init(args.init, len(class_names), args.input)
        else:
            config = PanFcnConfig(num_classes=len(class_names), input_wh=args.input)
    else:
        config = SemanticNetConfig(num_classes=len(class_names), input_wh=args.input, widths=args.widths,
                                   depths=(1,) + (2,) * (len(args.widths) - 1))
    model = build_semantic_model(config)
    if init_state:
        own = model.state_dict()
        matched = {k: v for k, v in init_state.items() if k in own and own[k].shape == v.shape}
        model.load_state_dict(matched, strict=False)
        print(f"init: {len(matched)}/{len(own)} tensors from {args.init}", file=sys.stderr)
    from training.train import bf16_supported

    use_bf16 = args.bf16 == "on" or (args.bf16 == "auto" and bf16_supported())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    start_epoch, iteration, best = 0, 0, -1.0
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            start_epoch, iteration, best = int(ckpt["epoch"]), int(ckpt["iteration"]), float(ckpt["best_miou"])
        except (KeyError, ValueError, RuntimeError) as e:
            why = (str(e).strip().splitlines() or [type(e).__name__])[-1]
            raise TrainError(f"{out / 'last.pt'}: cannot resume from this checkpoint ({why[:200]})") from e
    val_seed = args.seed + VAL_SEED_OFFSET
    ipe = args.images // args.batch
    total = args.epochs * ipe if not args.max_iters else min(args.epochs * ipe, args.max_iters)
    seeds = {"train_dataset": args.seed, "val_dataset": val_seed, "torch": args.seed, "epoch_plan": args.seed}
    command = "python -m training.train_semantic " + shlex.join(argv)
    commands = [*ckpt.get("commands", [ckpt.get("command")]), command] if ckpt is not None else [command]
    print(f"semantic: {type(model).__name__} {count_parameters(model)} params, input {config.input_wh}, "
          f"crop {args.crop}, bf16={use_bf16}, "
          f"{args.images} train / {args.val_images} val images, {ipe} iters/epoch, {total} iters in all"
          + (f", resuming at epoch {start_epoch} iteration {iteration}" if ckpt else ""), file=sys.stderr)
    if iteration >= total:
        print(f"semantic: already trained {iteration} of {total} iterations; nothing to do", file=sys.stderr)
        return 0

    train = build_cache(seed=args.seed, num_images=args.images, input_wh=config.input_wh,
                        h264_fraction=args.h264_fraction, desc="train cache")
    val = build_cache(seed=val_seed, num_images=args.val_images, input_wh=config.input_wh,
                      h264_fraction=args.h264_fraction, desc="val cache")

    def checkpoint(epoch_done: int, metrics: dict[str, Any], with_optimizer: bool) -> dict[str, Any]:
        d: dict[str, Any] = {
            "task": TASK,
            "model": model.state_dict(),
            "model_config": config.to_dict(),
            "class_names": list(class_names),
            "input_wh": list(config.input_wh),
            "pad_value": PAD_VALUE,
            "epoch": epoch_done,
            "iteration": iteration,
            "best_miou": best,
            "metrics": metrics,
            "command": commands[0],
            "commands": commands,
            "args": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()},
            "seeds": seeds,
            "torch_version": str(torch.__version__),
        }
        if with_optimizer:
            d["optimizer"] = opt.state_dict()
        return d

    model.train()
    for epoch in range(start_epoch, args.epochs):
        plan = plan_epoch(seed=args.seed, epoch=epoch, num_images=args.images, batch=args.batch,
                          input_wh=config.input_wh, crop_wh=args.crop)
        first = iteration - epoch * ipe  # > 0 when resuming inside an epoch
        last = min(ipe, total - epoch * ipe)
        t0, loss_sum, n = time.perf_counter(), 0.0, 0
        bar = tqdm(range(max(first, 0), last), desc=f"epoch {epoch + 1}/{args.epochs}", unit="it", file=sys.stderr)
        for it in bar:
            lr = lr_at(iteration, total, args.lr)
            for group in opt.param_groups:
                group["lr"] = lr
            x, y = make_batch(train, plan, it, args.crop)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
                logits = model(x)
            logits = logits.float()
            loss = F.cross_entropy(logits, y)
            if args.dice > 0:
                loss = loss + args.dice * soft_dice_loss(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            iteration += 1
            loss_sum += float(loss.detach())
            n += 1
            bar.set_postfix(loss=f"{loss_sum / n:.4f}", lr=f"{lr:.2e}")
        bar.close()
        train_s = time.perf_counter() - t0
        cm = evaluate_cache(model, val, config.num_classes)
        iou = iou_per_class(cm)
        miou = mean_iou(cm)
        finished = iteration >= (epoch + 1) * ipe
        metrics = {
            "val_mIoU": miou,
            "val_iou_per_class": {name: (None if np.isnan(v) else float(v)) for name, v in zip(class_names, iou)},
            "val_pixel_accuracy": float(np.trace(cm) / max(cm.sum(), 1)),
            "val_data": f"SyntheticDataset(seed={val_seed}, num_images={args.val_images}), letterboxed "
                        f"{config.input_wh[0]}x{config.input_wh[1]}, {args.h264_fraction:.0%} H.264 CRF "
                        f"{H264_CRF_RANGE[0]}..{H264_CRF_RANGE[1]}, pad pixels excluded",
            "epoch": epoch + 1,
            "iteration": iteration,
            "train_loss": loss_sum / max(n, 1),
            "train_images_per_s": n * args.batch / max(train_s, 1e-9),
        }
        is_best = miou > best
        best = max(best, miou)
        epoch_done = epoch + 1 if finished else epoch
        _save(checkpoint(epoch_done, metrics, with_optimizer=True), out / "last.pt")
        if is_best:
            _save(checkpoint(epoch_done, metrics, with_optimizer=False), out / "best.pt")
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps({**metrics, "lr": lr_at(iteration - 1, total, args.lr), "best": is_best}) + "\n")
        print(f"epoch {epoch + 1}: loss {metrics['train_loss']:.4f}  val mIoU {miou:.4f}  "
              f"(best {best:.4f})  {metrics['train_images_per_s']:.1f} img/s", file=sys.stderr)
        if iteration >= total:
            break
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
