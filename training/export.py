"""Export a trained detector checkpoint to ONNX with its model card.

CLI::

    python -m training.export CHECKPOINT --out MODEL.onnx [--opset 17] [--name NAME]
        [--metrics-json FILE] [--data-seed S --val-images N] [--torch-export]

Writes ``MODEL.onnx`` (input ``images`` ``(batch, 3, H, W)``, outputs ``output0`` and, for
instance segmentation, ``output1``, dynamic batch axis ``batch``; the ultralytics YOLOv8 detect /
segment layouts, see ``streamdet.card.HeadLayout``) and ``MODEL.json``, the
:class:`streamdet.card.ModelCard`. The ONNX file also carries ultralytics-style metadata
(``names``, ``imgsz``, ``stride``, ``task``, ``batch``) so other tools read it as an ultralytics export.

Before the files are renamed into place, ONNX Runtime is run against PyTorch on random inputs
(batch 2) and the largest absolute differences are printed (:func:`parity_report`; boxes
normalised by the input size); above ``1e-4`` the export fails.
``--torch-export`` also writes ``MODEL.pt2``, the ``torch.export`` program of the same model that
``--backend cuda`` runs (:func:`engines.cuda_backend.save_exported_program`: dynamic batch), after
the same check on the CPU (the program against PyTorch, same tolerance).
``--metrics-json`` copies a metrics dict (e.g. ``training.evaluate --json-out``) into the card;
``--data-seed S --val-images N`` instead renders ``N`` held-out synthetic images with seed ``S``
and evaluates the exported model on them with :func:`training.evaluate.evaluate_model`.
Bad input prints one ``error: <path>: <problem>`` line and exits 1, leaving no output file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engines.base import Engine
from streamdet.card import (
    HeadLayout,
    HeadSpec,
    InputSpec,
    ModelCard,
    Normalization,
    Task,
    card_path_for,
    save_card,
)
from streamdet.cli import OneLineErrorParser, bounded_int, name_os_errors, non_negative_int, run_tool
from streamdet.constants import PAD_VALUE
from training.cli_common import command_line, remove_leftovers, seed_int
from training.errors import ExportError
from training.model import CHECKPOINT_FORMAT, NUM_MASK_COEFFS, Detector, DetectorConfig, model_summary

PARITY_TOLERANCE = 1e-4
"""Largest allowed absolute difference between ONNX Runtime and PyTorch outputs."""
MIN_OPSET = 17
"""The lowest ONNX opset the export writes (``--opset``)."""
MAX_OPSET = 20
"""The highest: that of PyTorch's TorchScript exporter (``dynamo=False``), which the export uses."""


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[Detector, dict[str, Any]]:
    """Load a detector checkpoint written by :mod:`training.train` (its EMA weights), in eval mode.

    Args:
        path: ``last.pt`` or ``best.pt``.

    Returns:
        The :class:`training.model.Detector` and the checkpoint dict.

    Raises:
        ExportError: if the file is missing, unreadable or not a detector checkpoint.
    """
    p = Path(path)
    if not p.is_file():
        raise ExportError(f"{p}: checkpoint not found")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:  # torch.load raises many unpickling error types
        raise ExportError(f"{p}: not a readable PyTorch checkpoint ({type(e).__name__})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ExportError(f"{p}: not a detector checkpoint (expected format {CHECKPOINT_FORMAT})")
    try:
        config = DetectorConfig.from_dict(ckpt["model_config"])
        model = Detector(config)
        model.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ExportError(f"{p}: checkpoint does not hold a valid detector ({str(e).splitlines()[0][:160]})") from e
    names = ckpt.get("class_names")
    if not isinstance(names, list) or len(names) != config.num_classes:
        raise ExportError(f"{p}: expected {config.num_classes} class names in the checkpoint, got {names!r:.80}")
    return model.eval(), ckpt


def ultralytics_metadata(config: DetectorConfig, class_names: Sequence[str], task: str) -> dict[str, str]:
    """ONNX ``metadata_props`` as ultralytics writes them (read by ``card_from_ultralytics_metadata``).

    Returns:
        ``names`` (dict literal), ``imgsz`` (``[h, w]``), ``stride``, ``task``, ``batch``, ``description``.
    """
    w, h = config.input_wh
    return {
        "description": f"streamdet YOLOv8-style {task} model",
        "author": "streamdet",
        "stride": "32",
        "task": task,
        "batch": "1",
        "imgsz": str([h, w]),
        "names": str({i: n for i, n in enumerate(class_names)}),
    }


def export_onnx(model: Detector, path: str | os.PathLike[str], opset: int = MIN_OPSET,
                metadata: dict[str, str] | None = None) -> None:
    """Export ``model`` (eval mode) to ``path`` with the TorchScript-based exporter.

    Args:
        model: the detector.
        path: destination ``.onnx`` (written directly; callers pass a temporary name).
        opset: ONNX opset (:data:`MIN_OPSET` to :data:`MAX_OPSET`).
        metadata: ``metadata_props`` to embed.

    Raises:
        ExportError: on an opset out of that range or a failed export.
    """
    import onnx

    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"--opset: expected {MIN_OPSET} to {MAX_OPSET}, got {opset}")
    model.eval()
    w, h = model.config.input_wh
    x = torch.zeros(1, 3, h, w)
    outputs = ["output0", "output1"] if model.segment else ["output0"]
    dyn = {"images": {0: "batch"}, **{o: {0: "batch"} for o in outputs}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), input_names=["images"], output_names=outputs,
                          opset_version=opset, dynamic_axes=dyn, dynamo=False, do_constant_folding=True)
    proto = onnx.load(str(path))
    for k, v in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def parity_report(model: Detector, onnx_path: str | os.PathLike[str], inputs: np.ndarray, *,
                  engine: Engine | None = None) -> dict[str, float]:
    """Largest absolute differences between PyTorch and ONNX Runtime outputs on ``inputs``, per output part.

    Box coordinates are in input pixels (up to 640), where float32 carries only ~3e-5 px per ULP
    and two correct float32 implementations (PyTorch with BatchNorm vs with BatchNorm folded,
    as ONNX Runtime runs it) already differ by ~1e-4 px; so the pass/fail figure ``max_abs_diff``
    takes boxes divided by the input width/height (``boxes_normalized``), alongside the scores,
    mask coefficients and prototypes as they are.

    Args:
        model: the detector (eval mode).
        onnx_path: its export.
        inputs: ``(B, 3, H, W)`` float32 in ``[0, 1]``.
        engine: the engine to compare instead of ONNX Runtime on ``onnx_path`` (e.g. the ``.pt2``
            program on ``engines.cuda_backend.CudaEngine``, on the CPU); not started yet.

    Returns:
        ``boxes_px``, ``boxes_normalized``, ``scores`` (and ``mask_coeffs``, ``protos`` for
        segment models) max abs differences, and ``max_abs_diff`` over all but ``boxes_px``.

    Raises:
        ExportError: if the ONNX outputs' count or shapes differ from PyTorch's.
    """
    from engines.onnxruntime_backend import OnnxRuntimeEngine

    with torch.no_grad():
        ref = model(torch.from_numpy(inputs))
    refs = [r.numpy() for r in (list(ref) if isinstance(ref, tuple) else [ref])]
    if engine is None:
        engine = OnnxRuntimeEngine(model_path=onnx_path, intra_op_threads=1)
    engine.start()
    try:
        outs = engine.infer(inputs)
    finally:
        engine.stop()
    if len(outs) != len(refs):
        raise ExportError(f"{onnx_path}: expected {len(refs)} outputs, got {len(outs)}")
    for o, r in zip(outs, refs, strict=True):
        if o.shape != r.shape:
            raise ExportError(f"{onnx_path}: output shape {o.shape} differs from PyTorch {r.shape}")
    w, h = model.config.input_wh
    nc = model.nc
    d0 = np.abs(outs[0].astype(np.float64) - refs[0])
    scale = np.array([w, h, w, h], dtype=np.float64).reshape(1, 4, 1)
    report = {
        "boxes_px": float(d0[:, :4].max()),
        "boxes_normalized": float((d0[:, :4] / scale).max()),
        "scores": float(d0[:, 4 : 4 + nc].max()),
    }
    if model.segment:
        report["mask_coeffs"] = float(d0[:, 4 + nc :].max())
        report["protos"] = float(np.abs(outs[1].astype(np.float64) - refs[1]).max())
    report["max_abs_diff"] = max(v for k, v in report.items() if k != "boxes_px")
    return report


def build_card(model: Detector, ckpt: dict[str, Any], *, name: str, export_command: str, opset: int,
               metrics: dict[str, Any] | None = None) -> ModelCard:
    """The model card of an exported detector.

    Args:
        model: the detector.
        ckpt: its checkpoint (class names, training command, seeds).
        name: model name.
        export_command: the export command line.
        opset: the ONNX opset.
        metrics: validation metrics to record.

    Returns:
        The :class:`streamdet.card.ModelCard`.
    """
    cfg = model.config
    w, h = cfg.input_wh
    segment = model.segment
    head = HeadSpec(
        layout=HeadLayout.ULTRALYTICS_SEGMENT if segment else HeadLayout.ULTRALYTICS_DETECT,
        num_classes=cfg.num_classes,
        strides=tuple(model.strides),
        num_mask_coeffs=NUM_MASK_COEFFS if segment else 0,
        outputs=("output0", "output1") if segment else ("output0",),
        mask_hw=(h // 4, w // 4) if segment else None,
    )
    summary = model_summary(model)
    provenance = {
        "training_command": ckpt.get("command"),
        "seed": ckpt.get("seed"),
        "data_seed": ckpt.get("data_seed"),
        "val_data_seed": ckpt.get("val_data_seed"),
        "train_images": ckpt.get("train_images"),
        "val_images": ckpt.get("val_images"),
        "h264_fraction": ckpt.get("h264_fraction"),
        **({"scene": ckpt["scene"]} if ckpt.get("scene", "shapes") != "shapes" else {}),
        "epochs_trained": int(ckpt.get("epoch", -1)) + 1,
        "iterations": ckpt.get("iteration"),
        "training_val_metrics_input_pixels": ckpt.get("val_metrics"),
        "model_config": cfg.to_dict(),
        "architecture": "YOLOv8-style: C2f backbone, PAN-FPN, decoupled DFL head (training/model.py)",
        "export_command": export_command,
        "opset": opset,
        "torch_version": torch.__version__,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return ModelCard(
        name=name,
        task=Task.SEGMENT if segment else Task.DETECT,
        head=head,
        input=InputSpec(name="images", width=w, height=h, dynamic_batch=True),
        normalization=Normalization(mean=(0.0, 0.0, 0.0), std=(255.0, 255.0, 255.0)),
        pad_value=PAD_VALUE,
        class_names=tuple(ckpt["class_names"]),
        metrics=metrics or {},
        provenance=provenance,
        params=int(summary["params"]),
        gflops=float(summary["gflops"]),
    )


def _evaluate_on_synthetic(onnx_path: Path, card_path: Path, seed: int, n: int, scene: str = "shapes",
                           input_wh: tuple[int, int] | None = None) -> dict[str, Any]:
    """Render ``n`` synthetic images (seed ``seed``, the model's training scene) and evaluate the model on them."""
    from training.dataset import write_dataset
    from training.evaluate import evaluate_model

    with tempfile.TemporaryDirectory(prefix="streamdet-export-eval-") as tmp:
        data = write_dataset(Path(tmp) / "data", num_images=n, seed=seed, show_progress=False, scene=scene,
                             input_wh=input_wh)
        result = evaluate_model(model_path=onnx_path, data_dir=data, card_path=card_path, show_progress=False)
    generator = "training.synth.SyntheticDataset" if scene == "shapes" else f"training.plates ({scene})"
    result["data"] = {"generator": generator, "seed": seed, "num_images": n}
    return result


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    p = OneLineErrorParser(prog="python -m training.export", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="training checkpoint (RUN_DIR/best.pt or last.pt)")
    p.add_argument("--out", required=True, help="output MODEL.onnx (the card goes to MODEL.json)")
    p.add_argument("--opset", type=bounded_int(ge=MIN_OPSET, le=MAX_OPSET), default=MIN_OPSET,
                   help=f"ONNX opset ({MIN_OPSET} to {MAX_OPSET})")
    p.add_argument("--name", default=None, help="model name in the card (default: the file stem)")
    p.add_argument("--metrics-json", default=None, help="metrics JSON to copy into the card")
    p.add_argument("--data-seed", type=seed_int, default=None,
                   help="evaluate on synthetic images of this seed (0..2^32-1)")
    p.add_argument("--val-images", type=non_negative_int, default=0, help="number of synthetic images to evaluate on")
    p.add_argument("--torch-export", action="store_true",
                   help="also write MODEL.pt2, the torch.export program that --backend cuda runs")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Export; see the module docstring.

    Args:
        argv: command-line arguments without the program name (``sys.argv[1:]`` when None).

    Returns:
        0 on success, 1 on bad input (one ``error:`` line on stderr).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    command = command_line("training.export", argv)

    def run(args: argparse.Namespace) -> None:
        with name_os_errors(args.out):
            run_export(args, command)

    return run_tool(build_parser(), run, argv, errors=(ExportError,))


def run_export(args: argparse.Namespace, command: str) -> None:
    """Do the export of :func:`main` (see the module docstring).

    Raises:
        ExportError: on bad input or a failed parity check.
        OSError: if the output cannot be written.
    """
    out = Path(args.out)
    if out.suffix != ".onnx":
        raise ExportError(f"{out}: expected an output path ending in .onnx")
    if (args.data_seed is None) != (args.val_images <= 0):
        raise ExportError(f"{out}: --data-seed and --val-images go together (got {args.data_seed}, {args.val_images})")
    metrics: dict[str, Any] = {}
    if args.metrics_json:
        mp = Path(args.metrics_json)
        try:
            metrics = json.loads(mp.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ExportError(f"{mp}: not a readable metrics JSON file ({e})") from e
        if not isinstance(metrics, dict):
            raise ExportError(f"{mp}: expected a JSON object of metrics")
    model, ckpt = load_checkpoint(args.checkpoint)
    if not out.parent.is_dir():
        raise ExportError(f"{out}: output directory {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK):
        raise ExportError(f"{out}: output directory {out.parent} is not writable")
    card_path = card_path_for(out)
    tmp_onnx = out.with_name(f".{out.name}.tmp")
    tmp_card = card_path.with_name(f".{card_path.name}.tmp")
    tmp_pt2 = out.with_name(f".{out.stem}.export.pt2")  # (torch.export wants the .pt2 suffix)
    try:
        export_onnx(model, tmp_onnx, args.opset,
                    ultralytics_metadata(model.config, ckpt["class_names"], "segment" if model.segment else "detect"))
        w, h = model.config.input_wh
        rng = np.random.default_rng(0)
        inputs = rng.random((2, 3, h, w), dtype=np.float32)
        _require_parity(parity_report(model, tmp_onnx, inputs), out, "ONNX Runtime",
                        "parity (random inputs, batch 2): max |onnxruntime - torch|")
        card = build_card(model, ckpt, name=args.name or out.stem, export_command=command, opset=args.opset,
                          metrics=metrics)
        save_card(card, tmp_card)
        if args.data_seed is not None:
            result = _evaluate_on_synthetic(tmp_onnx, tmp_card, args.data_seed, args.val_images,
                                            str(ckpt.get("scene", "shapes")),
                                            (int(model.config.input_wh[0]), int(model.config.input_wh[1])))
            result["model"] = str(out)
            print(f"evaluation: {result.get('summary')}")
            card = card.model_copy(update={"metrics": result})
            save_card(card, tmp_card)
        if args.torch_export:
            _export_program(model, tmp_pt2, tmp_onnx, inputs)
        os.replace(tmp_onnx, out)
        os.replace(tmp_card, card_path)
        if args.torch_export:
            os.replace(tmp_pt2, out.with_suffix(".pt2"))
    finally:
        remove_leftovers(tmp_onnx, tmp_card, tmp_pt2)
    also = f" and {out.with_suffix('.pt2')}" if args.torch_export else ""
    print(f"wrote {out}, {card_path}{also} ({card.params} params, {card.gflops} GFLOPs)")


def _export_program(model: Detector, path: Path, onnx_path: Path, inputs: np.ndarray) -> None:
    """Write the ``torch.export`` program (``--torch-export``) and check it against PyTorch as the ONNX file was.

    Raises:
        ExportError: if ``torch.export`` cannot trace the model or the program's outputs differ.
    """
    from engines.cuda_backend import CudaEngine, save_exported_program

    try:
        save_exported_program(model, path, input_wh=model.config.input_wh)
    except (RuntimeError, ValueError) as e:
        raise ExportError(f"{path}: torch.export failed ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from e
    _require_parity(parity_report(model, onnx_path, inputs, engine=CudaEngine(model_path=path, device="cpu")), path,
                    "the torch.export program",
                    "parity of the torch.export program (random inputs, batch 2, CPU): max |program - torch|")


def _require_parity(report: dict[str, float], path: Path, what: str, heading: str) -> None:
    """Print a :func:`parity_report` after ``heading``.

    Raises:
        ExportError: naming ``path`` and ``what`` when ``max_abs_diff`` is over :data:`PARITY_TOLERANCE`.
    """
    print(f"{heading} " + " ".join(f"{k}={v:.3g}" for k, v in report.items()))
    if not report["max_abs_diff"] <= PARITY_TOLERANCE:
        raise ExportError(f"{path}: {what} differs from PyTorch by {report['max_abs_diff']:.3g} > {PARITY_TOLERANCE}")


if __name__ == "__main__":
    raise SystemExit(main())
