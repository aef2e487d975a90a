"""Train the semantic segmenter (:class:`training.semantic_model.SemanticNet`) on synthetic data.

The training and validation sets are built once, in memory, from
:class:`training.synth.SyntheticDataset` (validation from a different seed): each frame is letterboxed
to the model input (pad 114; its class map with nearest-neighbour interpolation and pad label 0),
and about half of the frames first go through an H.264 encode/decode round trip
(:func:`training.augment.h264_roundtrip`: libx264, yuv420p, CRF 20..38) so the model sees the block
and ringing artifacts of the videos it will run on (:mod:`training.semantic_data`).

Each iteration takes a batch of random crops (random horizontal and vertical flips: every class is
mirror-symmetric) and minimises cross-entropy plus a soft Dice loss with AdamW and a cosine learning
rate (linear warm-up, :mod:`training.schedule`). After each epoch it computes the validation mIoU
(:mod:`training.metrics`, over the non-padded pixels) and writes ``RUN_DIR/last.pt``,
``RUN_DIR/best.pt`` (highest validation mIoU) and a row of ``RUN_DIR/log.csv``
(:mod:`training.runlog`). ``--resume`` continues from ``RUN_DIR/last.pt``.

Usage::

    python -m training.train_semantic --out runs/semantic --images 2000 --epochs 40 --threads 2

References: Milletari et al., "V-Net" (2016) for the soft Dice loss; Loshchilov & Hutter,
"SGDR" (2017) for the cosine schedule, "Decoupled Weight Decay Regularization" (2019) for AdamW.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from tqdm import tqdm

from streamdet.cli import (
    OneLineErrorParser,
    UsageError,
    enum_option,
    finite_float,
    name_os_errors,
    non_negative_int,
    positive_int,
    run_tool,
)
from streamdet.constants import PAD_VALUE
from training.checkpoint import load_matching, save_checkpoint
from training.cli_common import (
    check_run_dir,
    command_line,
    decay_float,
    fraction_float,
    lr_float,
    seed_int,
    threads_int,
    wh_type,
)
from training.errors import TrainError
from training.loop import autocast, optimizer_step, setup_run, use_bf16
from training.metrics import confusion_matrix, iou_per_class, mean_iou, pixel_accuracy
from training.runlog import RunLog
from training.schedule import current_lr, warmup_cosine
from training.semantic_checkpoint import TASK, detector_init, load_checkpoint
from training.semantic_data import (
    H264_CRF_RANGE,
    EpochPlan,
    SemanticCache,
    build_cache,
    make_batch,
    plan_epoch,
    valid_mask,
)
from training.semantic_model import (
    DEFAULT_INPUT_WH,
    PanFcnConfig,
    SemanticArch,
    SemanticConfig,
    SemanticNetConfig,
    build_semantic_model,
    count_parameters,
    semantic_config_from_dict,
)

__all__ = [
    "H264_CRF_RANGE", "PAD_VALUE", "TASK", "VAL_SEED_OFFSET", "WARMUP_ITERS", "EpochPlan", "SemanticCache",
    "TrainError", "build_cache", "build_parser", "confusion_matrix", "detector_init", "evaluate_cache",
    "iou_per_class", "load_checkpoint", "main", "make_batch", "mean_iou", "plan_epoch", "semantic_class_names",
    "soft_dice_loss", "valid_mask", "warmup_iters",
]

VAL_SEED_OFFSET = 100_000
"""The validation set uses ``seed + VAL_SEED_OFFSET`` (a different seed from the training set)."""
WARMUP_ITERS = 200
MAX_DICE = 100.0
"""The largest ``--dice`` weight."""
FINAL_LR_RATIO = 0.02
LOG_COLUMNS = ("train_loss", "val_mIoU", "val_pixel_accuracy")


def warmup_iters(total: int) -> int:
    """Warm-up iterations of a run of ``total``: :data:`WARMUP_ITERS`, shortened to a tenth of short runs."""
    return min(WARMUP_ITERS, max(1, total // 10))


def semantic_class_names() -> tuple[str, ...]:
    """``("background", *CLASS_NAMES)``: the semantic model's class names, index = class id."""
    from training.synth import CLASS_NAMES

    return ("background", *CLASS_NAMES)



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




MAX_WIDTH = 1024
"""The largest channel count of one ``--widths`` stage."""
MAX_STAGES = 8
"""The most ``--widths`` stages (the deepest stride is ``2 ** stages``)."""


def _parse_widths(text: str) -> tuple[int, ...]:
    expected = f"expected 2 to {MAX_STAGES} comma-separated integers from 1 to {MAX_WIDTH}, got {text!r}"
    try:
        widths = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(expected) from None
    if not 2 <= len(widths) <= MAX_STAGES or not all(1 <= w <= MAX_WIDTH for w in widths):
        raise argparse.ArgumentTypeError(expected)
    return widths


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (flags shared with ``training.train``, plus semantic-only ones).

    Every number is checked for its range here (one ``error:`` line, exit status 2).
    """
    p = OneLineErrorParser(prog="python -m training.train_semantic", description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="run directory (last.pt, best.pt, log.csv)")
    p.add_argument("--images", type=positive_int, default=2000,
                   help="training images (SyntheticDataset size; at least --batch)")
    p.add_argument("--val-images", type=positive_int, default=200, help=f"validation images (seed + {VAL_SEED_OFFSET})")
    p.add_argument("--seed", type=seed_int, default=0, help="training-set and initialisation seed (0..2^32-1)")
    p.add_argument("--epochs", type=positive_int, default=40, help="passes over the training images")
    p.add_argument("--batch", type=positive_int, default=8, help="crops per iteration")
    p.add_argument("--lr", type=lr_float, default=3e-3, help="peak AdamW learning rate (> 0, at most 1)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt with its saved settings")
    p.add_argument("--max-iters", type=non_negative_int, default=0,
                   help="stop after this many iterations in all (0: no limit)")
    p.add_argument("--threads", type=threads_int, default=2, help="torch CPU threads")
    p.add_argument("--crop", type=wh_type(), default=(384, 256),
                   help="training crop WIDTHxHEIGHT of the input (multiples of the deepest stride)")
    p.add_argument("--input", type=wh_type(), default=DEFAULT_INPUT_WH,
                   help="model input WIDTHxHEIGHT (multiples of the deepest stride: 2^stages for unet, 32 for pan_fcn)")
    enum_option(p, "--arch", SemanticArch, default=SemanticArch.UNET,
                help="unet: the plain U-Net from random weights; pan_fcn: the detector's backbone and FPN "
                     "with an FCN head (initialise it with --init DETECTOR_CHECKPOINT)"
                     "%(default).0s")  # enum_option states the default; keeps the formatter from repeating it
    p.add_argument("--init", default=None,
                   help="pan_fcn: initialise the backbone and FPN from this detector checkpoint "
                        "(training.train --task detect); its widths and depths are taken")
    p.add_argument("--widths", type=_parse_widths, default=SemanticNetConfig().widths,
                   help=f"unet: encoder stage widths (strides 2, 4, ...; 2 to {MAX_STAGES} stages)")
    p.add_argument("--dice", type=finite_float(ge=0, le=MAX_DICE), default=0.5,
                   help=f"weight of the soft Dice loss (0: cross-entropy only; at most {MAX_DICE})")
    p.add_argument("--weight-decay", type=decay_float, default=1e-4, help="AdamW decoupled weight decay (0..1)")
    p.add_argument("--h264-fraction", type=fraction_float, default=0.5,
                   help="fraction of images with H.264 artifacts (0..1)")
    p.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                   help="bfloat16 autocast for the forward pass (auto: where the CPU has native bf16)")
    return p


# settings that a resumed run takes from its checkpoint, not from the command line
_RESUMED_KEYS = ("images", "val_images", "seed", "batch", "lr", "crop", "input", "widths", "dice",
                 "weight_decay", "h264_fraction", "arch", "init")


def _check_args(a: argparse.Namespace) -> None:
    """The checks between options (the parser checks each option's own range).

    Raises:
        UsageError: on ``--images`` fewer than ``--batch``, a ``--crop`` outside ``--input``, sizes
            that are not multiples of the model's deepest stride, or ``--init`` without ``pan_fcn``.
    """
    if a.images < a.batch:
        raise UsageError(f"--images: expected at least --batch ({a.batch}) images, got {a.images}")
    if a.crop[0] > a.input[0] or a.crop[1] > a.input[1]:
        raise UsageError(f"--crop: expected a crop inside --input {a.input[0]}x{a.input[1]}, "
                         f"got {a.crop[0]}x{a.crop[1]}")
    if SemanticArch(a.arch) is SemanticArch.PAN_FCN:
        stride, model = 32, "--arch pan_fcn"
    else:
        stride, model = 2 ** len(a.widths), f"{len(a.widths)} --widths stages"
    for flag, (w, h) in (("--input", a.input), ("--crop", a.crop)):
        if w % stride or h % stride:
            raise UsageError(f"{flag}: expected multiples of {stride} (the deepest stride of {model}), got {w}x{h}")
    if a.init and a.arch is not SemanticArch.PAN_FCN:
        raise UsageError(f"--init: expected --arch {SemanticArch.PAN_FCN.value} (the U-Net has no detector backbone)")


def main(argv: Sequence[str] | None = None) -> int:
    """Train; see the module docstring.

    Args:
        argv: command-line arguments (without the program name); ``sys.argv[1:]`` when None.

    Returns:
        0 on success, 1 on a bad input (one ``error:`` line on stderr), 2 on a bad argument.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_tool(build_parser(), lambda args: _train(args, argv), argv, errors=(TrainError,))


def _resume_args(args: argparse.Namespace, ckpt: dict[str, Any]) -> None:
    """Take the :data:`_RESUMED_KEYS` settings from the checkpoint's saved arguments."""
    saved = ckpt.get("args", {})
    for key in _RESUMED_KEYS:
        if key in saved:
            v = saved[key]
            setattr(args, key, tuple(v) if isinstance(v, list) else v)
    args.arch = SemanticArch(args.arch)


def _build_model(args: argparse.Namespace, ckpt: dict[str, Any] | None, out: Path,
                 num_classes: int) -> tuple[SemanticConfig, torch.nn.Module]:
    """The model config (from the checkpoint on resume, else the arguments) and the model."""
    config: SemanticConfig
    init_state: dict[str, torch.Tensor] = {}
    if ckpt is not None:
        try:
            config = semantic_config_from_dict(dict(ckpt["model_config"]))
        except (TypeError, ValueError) as e:
            raise TrainError(f"{out / 'last.pt'}: bad model config ({e})") from e
    elif args.arch is SemanticArch.PAN_FCN:
        if args.init:
            config, init_state = detector_init(args.init, num_classes, args.input)
        else:
            config = PanFcnConfig(num_classes=num_classes, input_wh=args.input)
    else:
        config = SemanticNetConfig(num_classes=num_classes, input_wh=args.input, widths=args.widths,
                                   depths=(1,) + (2,) * (len(args.widths) - 1))
    model = build_semantic_model(config)
    if init_state:
        copied, own = load_matching(model, init_state)
        print(f"init: {copied}/{own} tensors from {args.init}", file=sys.stderr)
    return config, model


def _plain_args(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments as plain types for a ``weights_only`` checkpoint (lists, Enum values)."""
    return {k: list(v) if isinstance(v, tuple) else (v.value if isinstance(v, SemanticArch) else v)
            for k, v in vars(args).items()}


def _train(args: argparse.Namespace, argv: list[str]) -> None:
    out = Path(args.out)
    check_run_dir(out, TrainError)
    ckpt: dict[str, Any] | None = None
    if args.resume:
        ckpt = load_checkpoint(out / "last.pt")
        _resume_args(args, ckpt)
    _check_args(args)
    with name_os_errors(out):
        _run(args, argv, out, ckpt)


def _run(args: argparse.Namespace, argv: list[str], out: Path, ckpt: dict[str, Any] | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise TrainError(f"{out}: run directory is not writable")
    setup_run(threads=args.threads, seed=args.seed)
    class_names = semantic_class_names()
    config, model = _build_model(args, ckpt, out, len(class_names))
    bf16 = use_bf16(args.bf16)
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
    command = command_line("training.train_semantic", argv)
    commands = [*ckpt.get("commands", [ckpt.get("command")]), command] if ckpt is not None else [command]
    print(f"semantic: {type(model).__name__} {count_parameters(model)} params, input {config.input_wh}, "
          f"crop {args.crop}, bf16={bf16}, "
          f"{args.images} train / {args.val_images} val images, {ipe} iters/epoch, {total} iters in all"
          + (f", resuming at epoch {start_epoch} iteration {iteration}" if ckpt else ""), file=sys.stderr)
    if iteration >= total:
        print(f"semantic: already trained {iteration} of {total} iterations; nothing to do", file=sys.stderr)
        return
    scheduler = warmup_cosine(opt, lr=args.lr, total=total, warmup=warmup_iters(total), final_ratio=FINAL_LR_RATIO,
                              iteration=iteration)
    train = build_cache(seed=args.seed, num_images=args.images, input_wh=config.input_wh,
                        h264_fraction=args.h264_fraction, desc="train cache")
    val = build_cache(seed=val_seed, num_images=args.val_images, input_wh=config.input_wh,
                      h264_fraction=args.h264_fraction, desc="val cache")
    log = RunLog(out, LOG_COLUMNS, resume=ckpt is not None)

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
            "args": _plain_args(args),
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
        lr = current_lr(opt)
        bar = tqdm(range(max(first, 0), last), desc=f"epoch {epoch + 1}/{args.epochs}", unit="it", file=sys.stderr)
        for it in bar:
            lr = current_lr(opt)
            x, y = make_batch(train, plan, it, args.crop)
            with autocast(bf16):
                logits = model(x)
            logits = logits.float()
            loss = F.cross_entropy(logits, y)
            if args.dice > 0:
                loss = loss + args.dice * soft_dice_loss(logits, y)
            optimizer_step(loss, opt, scheduler)
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
            "val_pixel_accuracy": pixel_accuracy(cm),
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
        save_checkpoint(out / "last.pt", checkpoint(epoch_done, metrics, with_optimizer=True))
        if is_best:
            save_checkpoint(out / "best.pt", checkpoint(epoch_done, metrics, with_optimizer=False))
        log.write(epoch=epoch + 1, iterations=iteration, lr=lr,
                  values={c: metrics[c] for c in LOG_COLUMNS}, images_per_s=metrics["train_images_per_s"],
                  epoch_s=time.perf_counter() - t0)
        print(f"epoch {epoch + 1}: loss {metrics['train_loss']:.4f}  val mIoU {miou:.4f}  "
              f"(best {best:.4f})  {metrics['train_images_per_s']:.1f} img/s", file=sys.stderr)
        if iteration >= total:
            break


if __name__ == "__main__":
    raise SystemExit(main())
