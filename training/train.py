"""Train the detector (or its instance-segmentation variant) on synthetic data.

CLI::

    python -m training.train --task detect|segment|semantic --out RUN_DIR [--images N] [--val-images N]
        [--seed S] [--epochs E] [--batch B] [--lr LR] [--resume] [--max-iters K] [--threads T]

``--task semantic`` runs :func:`training.train_semantic.main` with the other arguments.

Recipe (after ultralytics YOLOv8, Jocher et al.): AdamW (no weight decay on BatchNorm and biases),
linear warmup then cosine decay to ``lr * 0.01``, an exponential moving average of the weights
(``ModelEMA``: decay ``0.9999 * (1 - exp(-updates / 2000))``), task-aligned assignment and the
BCE + CIoU + DFL (+ mask BCE) loss of :mod:`training.loss`; channels-last activations and, where
the CPU has native bfloat16 (AVX512-BF16/AMX), a bf16-autocast forward pass (loss, optimizer and
EMA stay float32). Training images are letterboxed
synthetic frames, half of them re-encoded as H.264 (:mod:`training.traindata`), with HSV jitter,
flips and scale/translate per batch.

Each epoch ends with a validation on held-out images (seed ``seed + 100000``) by the EMA weights:
the loss and the box mAP (pycocotools, input pixels); ``RUN_DIR/last.pt`` is written every
epoch and ``RUN_DIR/best.pt`` when the fitness ``0.1 mAP50 + 0.9 mAP50-95`` improves. Losses
and metrics go to ``RUN_DIR/log.csv``. ``--resume`` continues from ``RUN_DIR/last.pt`` with its
saved settings (optimizer, schedule, EMA and epoch).
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import os
import random
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from streamdet.constants import DEFAULT_INPUT_WH
from training.augment import NO_AUGMENT, AugmentConfig
from training.loss import DetectionLoss
from training.model import CHECKPOINT_FORMAT, Detector, DetectorConfig, model_summary
from training.traindata import BatchLoader, CacheSpec, DetectionCache, load_or_build_cache

VAL_SEED_OFFSET = 100_000
"""The validation set is ``SyntheticDataset(seed=data_seed + VAL_SEED_OFFSET)`` (as training.train_semantic)."""
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "streamdet" / "traindata"


class TrainError(RuntimeError):
    """A bad input or state for training; the message names the file or option."""


ModuleT = TypeVar("ModuleT", bound=nn.Module)


class ModelEMA(Generic[ModuleT]):
    """Exponential moving average of a model's weights and buffers (ultralytics ``ModelEMA``).

    ``decay(updates) = decay * (1 - exp(-updates / tau))`` ramps the average in over the first
    few thousand updates. Reference: ultralytics ``utils/torch_utils.py``; Polyak & Juditsky 1992.

    Args:
        model: the model being trained (copied).
        decay: asymptotic decay.
        tau: ramp length in updates.
        updates: updates already done (on resume).
    """

    def __init__(self, model: ModuleT, decay: float = 0.9999, tau: float = 2000.0, updates: int = 0) -> None:
        self.ema: ModuleT = copy.deepcopy(model).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.decay, self.tau, self.updates = decay, tau, updates

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Blend the model's current floating-point state into the average."""
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.tau))
        msd = model.state_dict()
        for k, v in self.ema.state_dict().items():
            if v.dtype.is_floating_point:
                v.mul_(d).add_(msd[k].detach(), alpha=1 - d)
            else:
                v.copy_(msd[k])


def lr_at(iteration: int, total: int, warmup: int, lr: float, final_ratio: float = 0.01) -> float:
    """Learning rate: linear warmup from 0 over ``warmup`` iterations, then cosine to ``lr * final_ratio``.

    Args:
        iteration: 0-based iteration.
        total: total iterations of the run.
        warmup: warmup iterations.
        lr: peak learning rate.
        final_ratio: final / peak.

    Returns:
        The learning rate of ``iteration``.
    """
    if iteration < warmup:
        return lr * (iteration + 1) / warmup
    t = min(1.0, (iteration - warmup) / max(1, total - warmup))
    return lr * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on conv/linear weights only (not BatchNorm, not biases)."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if name == "weight" and not isinstance(module, nn.modules.batchnorm._BatchNorm):
                decay.append(p)
            else:
                no_decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def bf16_supported() -> bool:
    """Whether this CPU runs bfloat16 convolutions natively (oneDNN with AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (seeds any legacy global-RNG use in dependencies)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class ValResult:
    """Validation figures of one epoch.

    Attributes:
        losses: mean loss components by name.
        map50: box mAP@0.5 (input pixels, pycocotools).
        map50_95: box mAP@[.5:.95].
    """

    losses: dict[str, float]
    map50: float
    map50_95: float

    @property
    def fitness(self) -> float:
        """``0.1 mAP50 + 0.9 mAP50-95`` (ultralytics fitness)."""
        return 0.1 * self.map50 + 0.9 * self.map50_95


def coco_ground_truth(cache: DetectionCache, class_names: Sequence[str]) -> dict[str, Any]:
    """COCO ground truth of a cache's boxes, in input pixels (ignored objects as crowd).

    Returns:
        A COCO dict: ``images`` (id = cache index), ``annotations`` (``bbox`` xywh,
        ``category_id`` = class id + 1, ``iscrowd``), ``categories``.
    """
    w, h = cache.spec.input_wh
    images = [{"id": i, "width": w, "height": h, "file_name": f"{i:06d}"} for i in range(len(cache))]
    anns: list[dict[str, Any]] = []
    for i in range(len(cache)):
        boxes, classes, _ = cache.objects(i)
        ign = cache.ignore[int(cache.offsets[i]) : int(cache.offsets[i + 1])]
        for b, c, g in zip(boxes.tolist(), classes.tolist(), ign.tolist(), strict=True):
            bw, bh = b[2] - b[0], b[3] - b[1]
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(c) + 1,
                         "bbox": [b[0], b[1], bw, bh], "area": bw * bh, "iscrowd": int(g)})
    cats = [{"id": k + 1, "name": n} for k, n in enumerate(class_names)]
    return {"images": images, "annotations": anns, "categories": cats}


@torch.no_grad()
def validate(
    model: Detector, loss_fn: DetectionLoss, loader: BatchLoader, gt_coco: dict[str, Any], max_batches: int = 0
) -> ValResult:
    """Mean validation loss and box mAP of ``model`` (eval mode) on ``loader``'s images.

    Detections are decoded with the pipeline's :func:`streamdet.postprocess.decode_ultralytics_detect`
    at the mAP settings :data:`streamdet.postprocess.EVAL_CONFIG` and scored by
    :func:`training.evaluate.evaluate_coco`, all in input pixels.

    Args:
        model: the (EMA) detector.
        loss_fn: the training loss.
        loader: unshuffled, unaugmented batches of the validation cache.
        gt_coco: :func:`coco_ground_truth` of that cache.
        max_batches: validate on at most this many batches (0: all).

    Returns:
        The :class:`ValResult`.
    """
    from streamdet.postprocess import EVAL_CONFIG, decode_ultralytics_detect
    from training.evaluate import evaluate_coco

    was_training = model.training
    model.eval()
    totals = torch.zeros(len(loss_fn.item_names))
    count = 0
    dets: list[dict[str, Any]] = []
    seen: set[int] = set()
    for bi, batch in enumerate(loader.epoch(0)):
        if max_batches and bi >= max_batches:
            break
        raw = model.forward_raw(batch.images)
        _, items = loss_fn(raw, batch.targets)
        totals += items
        count += 1
        out0 = model.decode(raw["feats"]).numpy()
        cands = decode_ultralytics_detect(out0, num_classes=model.nc, cfg=EVAL_CONFIG)
        for idx, c in zip(batch.indices.tolist(), cands, strict=True):
            seen.add(int(idx))
            for b, s, k in zip(c.boxes_xyxy.tolist(), c.scores.tolist(), c.class_ids.tolist(), strict=True):
                dets.append({"image_id": int(idx), "category_id": int(k) + 1, "score": float(s),
                             "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]})
    model.train(was_training)
    gt = dict(gt_coco)
    gt["images"] = [im for im in gt_coco["images"] if im["id"] in seen]
    gt["annotations"] = [a for a in gt_coco["annotations"] if a["image_id"] in seen]
    metrics = evaluate_coco(gt, dets, "bbox")
    losses = {n: float(v) / max(1, count) for n, v in zip(loss_fn.item_names, totals.tolist(), strict=True)}
    return ValResult(losses=losses, map50=float(metrics["mAP50"] or 0.0), map50_95=float(metrics["mAP50-95"] or 0.0))


def _parse_wh(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}") from e
    if w <= 0 or h <= 0 or w % 32 or h % 32:
        raise argparse.ArgumentTypeError(f"expected positive multiples of 32 as WIDTHxHEIGHT, got {text!r}")
    return (w, h)


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", choices=("detect", "segment", "semantic"), default="detect")
    p.add_argument("--out", required=True, help="run directory (last.pt, best.pt, log.csv)")
    p.add_argument("--images", type=int, default=4000, help="training images (SyntheticDataset size)")
    p.add_argument("--val-images", type=int, default=200, help=f"validation images (seed + {VAL_SEED_OFFSET})")
    p.add_argument("--seed", type=int, default=0, help="initialisation and augmentation seed")
    p.add_argument("--data-seed", type=int, default=None, help="SyntheticDataset seed (default: --seed)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW decoupled weight decay (conv weights)")
    p.add_argument("--warmup-epochs", type=float, default=2.0)
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt with its saved settings")
    p.add_argument("--init", default=None,
                   help="initialise from this checkpoint's weights where names and shapes match "
                        "(e.g. a trained detector for its segment variant)")
    p.add_argument("--max-iters", type=int, default=0, help="stop after this many iterations in all (0: no limit)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--input", type=_parse_wh, default=DEFAULT_INPUT_WH,
                   help="model input WIDTHxHEIGHT (multiples of 32)")
    p.add_argument("--width-mult", type=float, default=1.0, help="channel multiplier of the detector")
    p.add_argument("--depth-mult", type=float, default=1.0, help="C2f depth multiplier of the detector")
    p.add_argument("--h264-fraction", type=float, default=0.5, help="fraction of images re-encoded as H.264")
    p.add_argument("--no-augment", action="store_true", help="no per-batch augmentation")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR), help="rendered-data cache ('' for none)")
    p.add_argument("--workers", type=int, default=1, help="processes rendering the data cache")
    p.add_argument("--val-batches", type=int, default=0, help="validate on at most this many batches (0: all)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                   help="bfloat16 autocast for the forward pass (auto: where the CPU has native bf16)")
    return p


def _check_args(a: argparse.Namespace) -> None:
    for name in ("images", "val_images", "epochs", "batch", "threads", "workers"):
        if getattr(a, name) <= 0:
            raise TrainError(f"--{name.replace('_', '-')}: expected > 0, got {getattr(a, name)}")
    if a.lr <= 0 or a.max_iters < 0 or a.val_batches < 0:
        raise TrainError(f"expected --lr > 0, --max-iters >= 0, --val-batches >= 0, "
                         f"got {a.lr}, {a.max_iters}, {a.val_batches}")
    if a.images < a.batch:
        raise TrainError(f"--images: expected at least --batch ({a.batch}) images, got {a.images}")


def _to_float(preds: dict[str, Any]) -> dict[str, Any]:
    """Cast a training-mode output to float32 (the loss runs in float32 under bf16 autocast)."""
    out: dict[str, Any] = {"feats": [f.float() for f in preds["feats"]]}
    if "protos" in preds:
        out["protos"] = preds["protos"].float()
    return out


def make_checkpoint(model: Detector, *, class_names: Sequence[str], task: str, **extra: Any) -> dict[str, Any]:
    """A checkpoint dict as :mod:`training.export` reads it.

    Args:
        model: the detector whose weights are exported (the EMA model during training).
        class_names: one name per class.
        task: ``detect`` or ``segment``.
        **extra: further entries (training state, command line, seeds, metrics).

    Returns:
        ``{"format", "model" (state dict), "model_config", "class_names", "task", "input_wh",
        "torch_version", "time", **extra}``.

    Raises:
        ValueError: if the class names do not match the model's class count.
    """
    if len(class_names) != model.nc:
        raise ValueError(f"expected {model.nc} class names, got {len(class_names)}")
    return {
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "model_config": model.config.to_dict(),
        "class_names": list(class_names),
        "task": task,
        "input_wh": list(model.config.input_wh),
        "torch_version": torch.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` to a temporary name, then rename (no partial checkpoint is ever visible)."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    """Train; see the module docstring.

    Args:
        argv: command-line arguments without the program name (``sys.argv[1:]`` when None).

    Returns:
        0 on success, 1 on bad input (one ``error:`` line on stderr).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--task", default="detect")
    known, rest = pre.parse_known_args(argv)
    if known.task == "semantic":
        from training import train_semantic

        return int(train_semantic.main(rest))
    args = build_parser().parse_args(argv)
    try:
        return _train(args, argv)
    except TrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        return 1


def _load_resume(out: Path, argv: list[str]) -> tuple[argparse.Namespace, dict[str, Any]]:
    path = out / "last.pt"
    if not path.is_file():
        raise TrainError(f"{path}: --resume given but there is no checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several unpickling errors
        raise TrainError(f"{path}: not a readable checkpoint ({type(e).__name__})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"{path}: not a detector checkpoint of format {CHECKPOINT_FORMAT}")
    now = build_parser().parse_args(argv)
    defaults = vars(build_parser().parse_args(["--out", str(out)]))
    args = argparse.Namespace(**{**defaults, **ckpt.get("args", {})})
    # settings that may change on resume; everything else comes from the checkpoint
    args.resume, args.threads, args.max_iters, args.no_progress = True, now.threads, now.max_iters, now.no_progress
    if any(a == "--epochs" or a.startswith("--epochs=") for a in argv):
        args.epochs = now.epochs
    return args, ckpt


def _init_from(model: torch.nn.Module, path: Path) -> None:
    """Copy the weights of checkpoint ``path`` into ``model`` where names and shapes match.

    Raises:
        TrainError: if the file is not a training checkpoint.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)  # our own checkpoints (as --resume)
        src = ckpt["model"]
    except Exception as e:  # torch.load raises many unpickling error types
        raise TrainError(f"{path}: not a training checkpoint ({e})") from e
    own = model.state_dict()
    matched = {k: v for k, v in src.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(matched, strict=False)
    print(f"init: {len(matched)}/{len(own)} tensors from {path}", flush=True)


def _train(args: argparse.Namespace, argv: list[str]) -> int:
    out = Path(args.out)
    ckpt: dict[str, Any] | None = None
    if args.resume:
        args, ckpt = _load_resume(out, argv)
    _check_args(args)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    import cv2

    cv2.setNumThreads(1)
    from training.synth import CLASS_NAMES

    data_seed = args.seed if args.data_seed is None else args.data_seed
    segment = args.task == "segment"
    config = DetectorConfig(num_classes=len(CLASS_NAMES), segment=segment, width_mult=args.width_mult,
                            depth_mult=args.depth_mult, input_wh=tuple(args.input))
    model = Detector(config)
    if args.init and ckpt is None:
        _init_from(model, Path(args.init))
    summary = model_summary(model)
    use_bf16 = args.bf16 == "on" or (args.bf16 == "auto" and bf16_supported())
    # channels-last activations: oneDNN's fast layout on CPU (measured ~1.2x on this model)
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    progress = not args.no_progress
    print(f"model: {args.task} params={summary['params']} GFLOPs={summary['gflops']} "
          f"channels={summary['channels']} input_wh={tuple(config.input_wh)} bf16={use_bf16}", flush=True)
    cache_dir = args.cache_dir or None
    train_spec = CacheSpec(seed=data_seed, num_images=args.images, input_wh=config.input_wh, with_masks=segment,
                           h264_fraction=args.h264_fraction)
    val_spec = CacheSpec(seed=data_seed + VAL_SEED_OFFSET, num_images=args.val_images, input_wh=config.input_wh,
                         with_masks=segment, h264_fraction=args.h264_fraction)
    train_cache = load_or_build_cache(train_spec, cache_dir, workers=args.workers, progress=progress)
    val_cache = load_or_build_cache(val_spec, cache_dir, workers=args.workers, progress=progress)
    augment = NO_AUGMENT if args.no_augment else AugmentConfig()
    loader = BatchLoader(cache=train_cache, batch_size=args.batch, augment=augment, seed=args.seed,
                         with_masks=segment)
    val_loader = BatchLoader(cache=val_cache, batch_size=args.batch, shuffle=False, drop_last=False,
                             with_masks=segment)
    gt_coco = coco_ground_truth(val_cache, CLASS_NAMES)
    loss_fn = DetectionLoss(model=model)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.999))
    ema = ModelEMA(model)
    iters_per_epoch = len(loader)
    total_iters = args.epochs * iters_per_epoch
    warmup = max(50, int(args.warmup_epochs * iters_per_epoch))
    start_epoch, start_batch, iteration, best_fitness = 0, 0, 0, -1.0
    if ckpt is not None:
        model.load_state_dict(ckpt["train_model"])
        ema.ema.load_state_dict(ckpt["model"])
        ema.updates = int(ckpt["ema_updates"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, start_batch = int(ckpt["resume_epoch"]), int(ckpt["resume_batch"])
        iteration = int(ckpt["iteration"])
        best_fitness = float(ckpt.get("best_fitness", -1.0))
        print(f"resumed from {out / 'last.pt'} at epoch {start_epoch} (iteration {iteration})", flush=True)
    command = "python -m training.train " + shlex.join(argv)
    log_path = out / "log.csv"
    names = loss_fn.item_names
    fields = (["epoch", "iterations", "lr"] + [f"train_{n}" for n in names] + [f"val_{n}" for n in names]
              + ["val_mAP50", "val_mAP50-95", "images_per_s", "epoch_s"])
    if not log_path.is_file() or ckpt is None:
        with log_path.open("w", newline="") as f:
            csv.writer(f).writerow(fields)
    model.train()
    stop = False
    for epoch in range(start_epoch, args.epochs):
        t0 = time.perf_counter()
        sums = torch.zeros(len(names))
        n_batches, n_images = 0, 0
        first = start_batch if epoch == start_epoch else 0
        bar = tqdm(loader.epoch(epoch, first), initial=first, total=iters_per_epoch,
                   desc=f"epoch {epoch + 1}/{args.epochs}", disable=not progress, dynamic_ncols=True)
        lr = args.lr
        for batch in bar:
            lr = lr_at(iteration, total_iters, warmup, args.lr)
            for g in optimizer.param_groups:
                g["lr"] = lr
            images = batch.images.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
                preds = model(images)
            loss, items = loss_fn(_to_float(preds), batch.targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)
            optimizer.step()
            ema.update(model)
            iteration += 1
            n_batches += 1
            n_images += batch.images.shape[0]
            sums += items
            if not math.isfinite(loss.item()):
                raise TrainError(f"non-finite loss at iteration {iteration} (lower --lr)")
            bar.set_postfix({n: f"{float(v) / n_batches:.3f}" for n, v in zip(names, sums, strict=True)} | {
                "lr": f"{lr:.2e}"})
            if args.max_iters and iteration >= args.max_iters:
                stop = True
                break
        bar.close()
        train_s = time.perf_counter() - t0
        ips = n_images / max(train_s, 1e-9)
        val = validate(ema.ema, loss_fn, val_loader, gt_coco, max_batches=args.val_batches)
        train_losses = {n: float(v) / max(1, n_batches) for n, v in zip(names, sums, strict=True)}
        row = [epoch + 1, iteration, f"{lr:.6g}"] + [f"{train_losses[n]:.5f}" for n in names] + [
            f"{val.losses[n]:.5f}" for n in names] + [f"{val.map50:.5f}", f"{val.map50_95:.5f}", f"{ips:.2f}",
                                                      f"{time.perf_counter() - t0:.1f}"]
        with log_path.open("a", newline="") as f:
            csv.writer(f).writerow(row)
        print(f"epoch {epoch + 1}: train loss {sum(train_losses.values()):.4f} val loss "
              f"{sum(val.losses.values()):.4f} mAP50 {val.map50:.4f} mAP50-95 {val.map50_95:.4f} "
              f"({ips:.1f} img/s)", flush=True)
        is_best = val.fitness > best_fitness
        best_fitness = max(best_fitness, val.fitness)
        state = make_checkpoint(
            ema.ema, class_names=CLASS_NAMES, task=args.task,
            train_model=model.state_dict(),
            optimizer=optimizer.state_dict(),
            ema_updates=ema.updates,
            epoch=epoch,
            resume_epoch=epoch if stop and first + n_batches < iters_per_epoch else epoch + 1,
            resume_batch=first + n_batches if stop and first + n_batches < iters_per_epoch else 0,
            iteration=iteration,
            best_fitness=best_fitness,
            command=command,
            args=vars(args),
            seed=args.seed,
            data_seed=data_seed,
            val_data_seed=data_seed + VAL_SEED_OFFSET,
            train_images=args.images,
            val_images=args.val_images,
            h264_fraction=args.h264_fraction,
            val_metrics={"mAP50": val.map50, "mAP50-95": val.map50_95,
                         **{f"loss_{k}": v for k, v in val.losses.items()}},
            summary=summary,
        )
        save_checkpoint(out / "last.pt", state)
        if is_best:
            save_checkpoint(out / "best.pt", {k: v for k, v in state.items()
                                              if k not in ("optimizer", "train_model")})
        if stop:
            break
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
