"""Train the detector (or its instance-segmentation variant) on synthetic data.

CLI::

    python -m training.train --task detect|segment|semantic [--scene shapes|plates|plate_chars] --out RUN_DIR
        [--images N] [--val-images N]
        [--seed S] [--epochs E] [--batch B] [--lr LR] [--resume] [--max-iters K] [--threads T]

``--task semantic`` runs :func:`training.train_semantic.main` with the other arguments.
``--scene plates`` trains the plate detector on plate-scene frames (class ``plate``), ``--scene
plate_chars`` the character model on letterboxed plate crops rendered at ``--input``
(:mod:`training.plates`; no flips, milder scale/translate); the scene is part of the data-cache key.

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
and metrics go to ``RUN_DIR/log.csv`` (:mod:`training.runlog`). ``--resume`` continues from ``RUN_DIR/last.pt`` with its
saved settings (optimizer, schedule, EMA and epoch).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from streamdet.cli import (
    OneLineErrorParser,
    UsageError,
    finite_float,
    invoked_as,
    name_os_errors,
    non_negative_int,
    positive_int,
    program_name,
    run_tool,
)
from streamdet.constants import DEFAULT_INPUT_WH
from training.augment import NO_AUGMENT, AugmentConfig
from training.checkpoint import load_matching, make_checkpoint, save_checkpoint
from training.cli_common import (
    MAX_MULTIPLIER,
    check_run_dir,
    command_line,
    decay_float,
    fraction_float,
    lr_float,
    multiplier_float,
    seed_int,
    threads_int,
    wh_type,
    workers_int,
)
from training.detect_val import ValResult, coco_ground_truth, validate
from training.ema import ModelEMA
from training.errors import TrainError
from training.loop import autocast, bf16_supported, optimizer_step, param_groups, seed_everything, setup_run, use_bf16
from training.loss import DetectionLoss
from training.model import CHECKPOINT_FORMAT, Detector, DetectorConfig, model_summary
from training.plates import SCENES, scene_class_names
from training.runlog import RunLog
from training.schedule import current_lr, warmup_cosine
from training.traindata import BatchLoader, CacheSpec, load_or_build_cache

__all__ = [
    "DEFAULT_CACHE_DIR", "FINAL_LR_RATIO", "VAL_SEED_OFFSET", "ModelEMA", "TrainError", "ValResult", "bf16_supported",
    "build_parser", "coco_ground_truth", "main", "make_checkpoint", "param_groups", "save_checkpoint",
    "seed_everything", "validate",
]

VAL_SEED_OFFSET = 100_000
"""The validation set is ``SyntheticDataset(seed=data_seed + VAL_SEED_OFFSET)`` (as training.train_semantic)."""
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "streamdet" / "traindata"
FINAL_LR_RATIO = 0.01
"""The cosine schedule ends at ``lr * FINAL_LR_RATIO``."""
MAX_WARMUP_EPOCHS = 1000
"""The largest ``--warmup-epochs``."""


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser; every number is checked for its range here (one line, exit status 2)."""
    p = OneLineErrorParser(prog="python -m training.train", description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", choices=("detect", "segment", "semantic"), default="detect")
    p.add_argument("--scene", choices=SCENES, default="shapes",
                   help="training data: shapes, plate-scene frames (plate detector) or letterboxed plate crops "
                        "(character segmenter, rendered at --input)")
    p.add_argument("--out", required=True, help="run directory (last.pt, best.pt, log.csv)")
    p.add_argument("--images", type=positive_int, default=4000,
                   help="training images (SyntheticDataset size; at least --batch)")
    p.add_argument("--val-images", type=positive_int, default=200, help=f"validation images (seed + {VAL_SEED_OFFSET})")
    p.add_argument("--seed", type=seed_int, default=0, help="initialisation and augmentation seed (0..2^32-1)")
    p.add_argument("--data-seed", type=seed_int, default=None, help="SyntheticDataset seed (default: --seed)")
    p.add_argument("--epochs", type=positive_int, default=30)
    p.add_argument("--batch", type=positive_int, default=16)
    p.add_argument("--lr", type=lr_float, default=2e-3, help="peak AdamW learning rate (> 0, at most 1)")
    p.add_argument("--weight-decay", type=decay_float, default=0.05,
                   help="AdamW decoupled weight decay (conv weights; 0..1)")
    p.add_argument("--warmup-epochs", type=finite_float(ge=0, le=MAX_WARMUP_EPOCHS), default=2.0,
                   help=f"linear warmup length in epochs (0..{MAX_WARMUP_EPOCHS}; at least 50 iterations)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt with its saved settings")
    p.add_argument("--init", default=None,
                   help="initialise from this checkpoint's weights where names and shapes match "
                        "(e.g. a trained detector for its segment variant)")
    p.add_argument("--max-iters", type=non_negative_int, default=0,
                   help="stop after this many iterations in all (0: no limit)")
    p.add_argument("--threads", type=threads_int, default=2, help="torch CPU threads")
    p.add_argument("--input", type=wh_type(32), default=DEFAULT_INPUT_WH,
                   help="model input WIDTHxHEIGHT (multiples of 32)")
    p.add_argument("--width-mult", type=multiplier_float, default=1.0,
                   help=f"channel multiplier of the detector (> 0, at most {MAX_MULTIPLIER:g})")
    p.add_argument("--depth-mult", type=multiplier_float, default=1.0,
                   help=f"C2f depth multiplier of the detector (> 0, at most {MAX_MULTIPLIER:g})")
    p.add_argument("--h264-fraction", type=fraction_float, default=None,
                   help="fraction of images re-encoded as H.264, 0..1 (default 0.5; 0 for plate_chars, whose crops "
                        "carry their own x264/JPEG round trip)")
    p.add_argument("--no-augment", action="store_true", help="no per-batch augmentation")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR), help="rendered-data cache ('' for none)")
    p.add_argument("--workers", type=workers_int, default=1, help="processes rendering the data cache")
    p.add_argument("--val-batches", type=non_negative_int, default=0,
                   help="validate on at most this many batches (0: all)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                   help="bfloat16 autocast for the forward pass (auto: where the CPU has native bf16)")
    return p


def _check_args(a: argparse.Namespace) -> None:
    """The checks between options (the parser checks each option's own range).

    Raises:
        UsageError: if ``--images`` is fewer than ``--batch``.
    """
    if a.images < a.batch:
        raise UsageError(f"--images: expected at least --batch ({a.batch}) images, got {a.images}")


def _to_float(preds: dict[str, Any]) -> dict[str, Any]:
    """Cast a training-mode output to float32 (the loss runs in float32 under bf16 autocast)."""
    out: dict[str, Any] = {"feats": [f.float() for f in preds["feats"]]}
    if "protos" in preds:
        out["protos"] = preds["protos"].float()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Train a detector or segmenter (``--task semantic`` hands the other arguments to train_semantic).

    Args:
        argv: the arguments after ``python -m training.train`` (when None, the process's own).

    Returns:
        The exit status: 0 when training finished, 1 after one ``error:`` line on stderr, 2 after
        one for a bad argument.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = invoked_as("python -m training.train")
    pre = OneLineErrorParser(prog=prog, add_help=False)
    pre.add_argument("--task", default="detect")
    known, rest = pre.parse_known_args(argv)
    if known.task == "semantic":
        from training import train_semantic

        with program_name(prog):  # the usage names the command the user typed
            return int(train_semantic.main(rest))
    return run_tool(build_parser(), lambda args: _train(args, argv), argv, errors=(TrainError,))


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
    copied, own = load_matching(model, src)
    print(f"init: {copied}/{own} tensors from {path}", flush=True)



def _train(args: argparse.Namespace, argv: list[str]) -> None:
    out = Path(args.out)
    with name_os_errors(out):
        check_run_dir(out, TrainError)
        ckpt: dict[str, Any] | None = None
        if args.resume:
            args, ckpt = _load_resume(out, argv)
        if args.h264_fraction is None:
            args.h264_fraction = 0.0 if args.scene == "plate_chars" else 0.5
        if args.task == "semantic" and args.scene != "shapes":
            raise TrainError(f"--scene {args.scene}: semantic training is for the shapes scene only")
        _check_args(args)
        out.mkdir(parents=True, exist_ok=True)
        setup_run(threads=args.threads, seed=args.seed)
        _Run(args, argv, out, ckpt).train()


class _Run:
    """One detector training run: model, data, optimizer, schedule, EMA, log, and the epoch loop."""

    def __init__(self, args: argparse.Namespace, argv: list[str], out: Path, ckpt: dict[str, Any] | None) -> None:
        scene = getattr(args, "scene", "shapes")
        class_names = scene_class_names(scene)
        self.args, self.out, self.ckpt, self.class_names = args, out, ckpt, class_names
        self.data_seed = args.seed if args.data_seed is None else args.data_seed
        segment = args.task == "segment"
        config = DetectorConfig(num_classes=len(class_names), segment=segment, width_mult=args.width_mult,
                                depth_mult=args.depth_mult, input_wh=tuple(args.input))
        model = Detector(config)
        if args.init and ckpt is None:
            _init_from(model, Path(args.init))
        self.summary = model_summary(model)
        self.bf16 = use_bf16(args.bf16)
        # channels-last activations: oneDNN's fast layout on CPU (measured ~1.2x on this model)
        self.model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.progress = not args.no_progress
        print(f"model: {args.task} params={self.summary['params']} GFLOPs={self.summary['gflops']} "
              f"channels={self.summary['channels']} input_wh={tuple(config.input_wh)} bf16={self.bf16}", flush=True)
        cache_dir = args.cache_dir or None
        train_spec = CacheSpec(seed=self.data_seed, num_images=args.images, input_wh=config.input_wh,
                               with_masks=segment, h264_fraction=args.h264_fraction, scene=scene)
        val_spec = CacheSpec(seed=self.data_seed + VAL_SEED_OFFSET, num_images=args.val_images,
                             input_wh=config.input_wh, with_masks=segment, h264_fraction=args.h264_fraction,
                             scene=scene)
        train_cache = load_or_build_cache(train_spec, cache_dir, workers=args.workers, progress=self.progress)
        val_cache = load_or_build_cache(val_spec, cache_dir, workers=args.workers, progress=self.progress)
        augment = NO_AUGMENT if args.no_augment else (
            # text reads left to right: no mirror; crops are centred by the letterbox: mild scale/shift
            AugmentConfig(fliplr=0.0, scale=0.15, translate=0.05) if scene == "plate_chars" else AugmentConfig())
        self.loader = BatchLoader(cache=train_cache, batch_size=args.batch, augment=augment, seed=args.seed,
                                  with_masks=segment)
        self.val_loader = BatchLoader(cache=val_cache, batch_size=args.batch, shuffle=False, drop_last=False,
                                      with_masks=segment)
        self.gt_coco = coco_ground_truth(val_cache, class_names)
        self.loss_fn = DetectionLoss(model=self.model)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, args.weight_decay), lr=args.lr,
                                           betas=(0.9, 0.999))
        self.ema = ModelEMA(self.model)
        self.iters_per_epoch = len(self.loader)
        self.start_epoch, self.start_batch, self.iteration, self.best_fitness = 0, 0, 0, -1.0
        if ckpt is not None:
            self.model.load_state_dict(ckpt["train_model"])
            self.ema.ema.load_state_dict(ckpt["model"])
            self.ema.updates = int(ckpt["ema_updates"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.start_epoch, self.start_batch = int(ckpt["resume_epoch"]), int(ckpt["resume_batch"])
            self.iteration = int(ckpt["iteration"])
            self.best_fitness = float(ckpt.get("best_fitness", -1.0))
            print(f"resumed from {out / 'last.pt'} at epoch {self.start_epoch} (iteration {self.iteration})",
                  flush=True)
        self.scheduler = warmup_cosine(
            self.optimizer, lr=args.lr, total=args.epochs * self.iters_per_epoch,
            warmup=max(50, int(args.warmup_epochs * self.iters_per_epoch)), final_ratio=FINAL_LR_RATIO,
            iteration=self.iteration)
        self.command = command_line("training.train", argv)
        names = self.loss_fn.item_names
        self.log = RunLog(out, [f"train_{n}" for n in names] + [f"val_{n}" for n in names]
                          + ["val_mAP50", "val_mAP50-95"], resume=ckpt is not None)

    def train(self) -> None:
        """Run the remaining epochs (or up to ``--max-iters``), validating and saving after each."""
        self.model.train()
        for epoch in range(self.start_epoch, self.args.epochs):
            if self._epoch(epoch):
                break

    def _epoch(self, epoch: int) -> bool:
        """Train, validate, log and save one epoch; True when ``--max-iters`` stopped the run."""
        args, names = self.args, self.loss_fn.item_names
        t0 = time.perf_counter()
        sums = torch.zeros(len(names))
        n_batches, n_images, stop = 0, 0, False
        first = self.start_batch if epoch == self.start_epoch else 0
        bar = tqdm(self.loader.epoch(epoch, first), initial=first, total=self.iters_per_epoch,
                   desc=f"epoch {epoch + 1}/{args.epochs}", disable=not self.progress, dynamic_ncols=True)
        lr = args.lr
        for batch in bar:
            lr = current_lr(self.optimizer)
            images = batch.images.contiguous(memory_format=torch.channels_last)
            with autocast(self.bf16):
                preds = self.model(images)
            loss, items = self.loss_fn(_to_float(preds), batch.targets)
            optimizer_step(loss, self.optimizer, self.scheduler, clip_params=self.model,
                           after_step=lambda: self.ema.update(self.model))
            self.iteration += 1
            n_batches += 1
            n_images += batch.images.shape[0]
            sums += items
            if not math.isfinite(loss.item()):
                raise TrainError(f"non-finite loss at iteration {self.iteration} (lower --lr)")
            bar.set_postfix({n: f"{float(v) / n_batches:.3f}" for n, v in zip(names, sums, strict=True)} | {
                "lr": f"{lr:.2e}"})
            if args.max_iters and self.iteration >= args.max_iters:
                stop = True
                break
        bar.close()
        ips = n_images / max(time.perf_counter() - t0, 1e-9)
        val = validate(self.ema.ema, self.loss_fn, self.val_loader, self.gt_coco, max_batches=args.val_batches)
        train_losses = {n: float(v) / max(1, n_batches) for n, v in zip(names, sums, strict=True)}
        self.log.write(epoch=epoch + 1, iterations=self.iteration, lr=lr,
                       values={**{f"train_{n}": v for n, v in train_losses.items()},
                               **{f"val_{n}": v for n, v in val.losses.items()},
                               "val_mAP50": val.map50, "val_mAP50-95": val.map50_95},
                       images_per_s=ips, epoch_s=time.perf_counter() - t0)
        print(f"epoch {epoch + 1}: train loss {sum(train_losses.values()):.4f} val loss "
              f"{sum(val.losses.values()):.4f} mAP50 {val.map50:.4f} mAP50-95 {val.map50_95:.4f} "
              f"({ips:.1f} img/s)", flush=True)
        inside = stop and first + n_batches < self.iters_per_epoch
        self._save(epoch, val, resume_epoch=epoch if inside else epoch + 1,
                   resume_batch=first + n_batches if inside else 0)
        return stop

    def _save(self, epoch: int, val: ValResult, *, resume_epoch: int, resume_batch: int) -> None:
        """Write ``last.pt`` (and ``best.pt`` when the fitness improved)."""
        args = self.args
        is_best = val.fitness > self.best_fitness
        self.best_fitness = max(self.best_fitness, val.fitness)
        state = make_checkpoint(
            self.ema.ema, class_names=self.class_names, task=args.task,
            train_model=self.model.state_dict(),
            optimizer=self.optimizer.state_dict(),
            ema_updates=self.ema.updates,
            epoch=epoch,
            resume_epoch=resume_epoch,
            resume_batch=resume_batch,
            iteration=self.iteration,
            best_fitness=self.best_fitness,
            command=self.command,
            args=vars(args),
            seed=args.seed,
            data_seed=self.data_seed,
            val_data_seed=self.data_seed + VAL_SEED_OFFSET,
            train_images=args.images,
            val_images=args.val_images,
            h264_fraction=args.h264_fraction,
            scene=getattr(args, "scene", "shapes"),
            val_metrics={"mAP50": val.map50, "mAP50-95": val.map50_95,
                         **{f"loss_{k}": v for k, v in val.losses.items()}},
            summary=self.summary,
        )
        save_checkpoint(self.out / "last.pt", state)
        if is_best:
            save_checkpoint(self.out / "best.pt", {k: v for k, v in state.items()
                                                   if k not in ("optimizer", "train_model")})


if __name__ == "__main__":
    raise SystemExit(main())
