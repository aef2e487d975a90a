"""Reduced-precision variants of an ONNX model: INT8 (Q/DQ, calibrated on the user's frames) and FP16.

CLI::

    python -m training.calibrate MODEL.onnx --source VIDEO_OR_DIR [--source ...] [--frames 64]
        [--out-int8 MODEL.int8.onnx] [--out-fp16 MODEL.fp16.onnx] [--method minmax|entropy|percentile]

Without ``--out-int8`` / ``--out-fp16`` both variants are written beside the model
(``MODEL.int8.onnx``, ``MODEL.fp16.onnx``), each with a model card copy (``MODEL.int8.json``, ...)
whose ``provenance.precision`` names the precision; inputs and outputs stay float32.

**INT8.** ``--frames`` frames, evenly spaced over all sources (videos decoded with PyAV, or image
directories: :mod:`engines.deploy.frames`), calibrate an ONNX Runtime static quantization with the
head's tail kept in FP32 (:mod:`engines.deploy.quantize`, graph analysis in :mod:`engines.deploy.graph`).

**FP16.** ``onnxconverter-common``'s float16 conversion with float32 inputs/outputs and the same
head tail in FP32 (:func:`engines.deploy.quantize.convert_fp16`; ``pip install onnxconverter-common``).

Bad input (a source with no frames: an empty directory, a file that is not a video; a model
without a card) prints one ``error: <path>: <problem>`` line and exits 1, leaving no output file.

This module is the CLI; it also re-exports the public names of the modules above, so
``from engines.deploy.calibrate import quantize_int8`` keeps working.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from engines.base import EngineError
from engines.deploy.cards import load_model_card, variant_card
from engines.deploy.coverage import confident_detections, coverage_warning
from engines.deploy.frames import (
    DEFAULT_FRAMES,
    IMAGE_SUFFIXES,
    FrameCalibrationReader,
    FrameSource,
    as_ort_reader,
    calibration_frames,
    evenly_spaced,
    probe_source,
)
from engines.deploy.graph import (
    graph_input_name,
    head_fp32_nodes,
    name_unnamed_nodes,
    onnx_precision,
    restore_float32_outputs,
)
from engines.deploy.options import CalibrationError, CalibrationMethod, Int8Target, OutputPrecision
from engines.deploy.quantize import FP16_INSTALL_HINT, INT8_OP_TYPES, convert_fp16, quantize_int8
from streamdet.card import ModelCard, card_path_for
from streamdet.cli import OneLineErrorParser, enum_option, name_os_errors, positive_int, run_tool

__all__ = [
    "DEFAULT_FRAMES",
    "FP16_INSTALL_HINT",
    "IMAGE_SUFFIXES",
    "INT8_OP_TYPES",
    "CalibrationError",
    "CalibrationMethod",
    "FrameCalibrationReader",
    "FrameSource",
    "Int8Target",
    "OutputPrecision",
    "as_ort_reader",
    "build_parser",
    "calibration_frames",
    "convert_fp16",
    "evenly_spaced",
    "graph_input_name",
    "head_fp32_nodes",
    "load_model_card",
    "main",
    "name_unnamed_nodes",
    "onnx_precision",
    "probe_source",
    "quantize_int8",
    "restore_float32_outputs",
    "run",
    "variant_card",
]

PROG = "python -m training.calibrate"
"""How users run this CLI (its usage line, and the command recorded in the variants' cards)."""


def _default_out(model: Path, precision: OutputPrecision) -> Path:
    return model.with_name(f"{model.stem}.{precision.value}.onnx")


def _write_variant(out: Path, card: ModelCard, make: Callable[[Path], dict[str, Any]], *,
                   precision: OutputPrecision, model: Path, command: str) -> dict[str, Any]:
    """Write ``out`` and its card through temporary names; nothing is left behind on failure."""
    tmp_model = out.with_name(f".{out.name}.tmp")
    out_card = card_path_for(out)
    tmp_card = out_card.with_name(f".{out_card.name}.tmp")
    try:
        details = make(tmp_model)
        new_card = variant_card(card, precision=precision, source_model=model, details=details, command=command)
        tmp_card.write_text(new_card.to_json() + "\n")
        os.replace(tmp_model, out)
        os.replace(tmp_card, out_card)
        return details
    finally:
        for t in (tmp_model, tmp_card):
            if t.exists():
                t.unlink()


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser: a bad option is one ``error:`` line naming it, exit status 2."""
    p = OneLineErrorParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="FP32 MODEL.onnx (its card MODEL.json beside it, or ultralytics metadata)")
    p.add_argument("--source", action="append", default=[],
                   help="calibration video or image directory (repeatable); needed for INT8")
    p.add_argument("--frames", type=positive_int, default=DEFAULT_FRAMES,
                   help=f"calibration frames, evenly spaced (default {DEFAULT_FRAMES})")
    p.add_argument("--out-int8", default=None, help="INT8 Q/DQ output (default MODEL.int8.onnx)")
    p.add_argument("--out-fp16", default=None, help="FP16 output (default MODEL.fp16.onnx)")
    enum_option(p, "--method", CalibrationMethod, default=CalibrationMethod.MINMAX,
                help="activation range estimation")
    p.add_argument("--per-tensor", action="store_true", help="per-tensor weight scales (default per-channel)")
    enum_option(p, "--target", Int8Target, default=Int8Target.TENSORRT,
                help="INT8 layout: tensorrt = symmetric int8, cpu = ONNX Runtime U8S8")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI (see the module docstring).

    Args:
        argv: arguments without the program name (``sys.argv[1:]`` when None).

    Returns:
        0 on success, 1 on bad input (one ``error:`` line on stderr), 2 on a bad argument (one
        ``error:`` line naming it).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    command = f"{PROG} " + shlex.join(argv)

    def run_named(args: argparse.Namespace) -> None:
        with name_os_errors(args.model):
            run(args, command)

    return run_tool(build_parser(), run_named, argv, errors=(CalibrationError,))


def run(args: argparse.Namespace, command: str) -> None:
    """Do the work of :func:`main`: check the arguments, then write the INT8 and/or FP16 variant.

    Args:
        args: the parsed arguments (:func:`build_parser`).
        command: the command line, recorded in the variants' cards.

    Raises:
        CalibrationError: on bad input or a failed conversion.
        OSError: if an output cannot be written.
    """
    model = Path(args.model)
    if not model.is_file():
        raise CalibrationError(f"{model}: model file not found")
    if args.frames < 1:
        raise CalibrationError(f"--frames: expected a positive count, got {args.frames}")
    explicit = args.out_int8 is not None or args.out_fp16 is not None
    out_int8 = Path(args.out_int8) if args.out_int8 else None
    out_fp16 = Path(args.out_fp16) if args.out_fp16 else None
    if not explicit:
        out_int8 = _default_out(model, OutputPrecision.INT8)
        out_fp16 = _default_out(model, OutputPrecision.FP16)
    for out in (out_int8, out_fp16):
        if out is not None:
            if out.suffix != ".onnx":
                raise CalibrationError(f"{out}: expected an output path ending in .onnx")
            if out.resolve() == model.resolve():
                raise CalibrationError(f"{out}: output would overwrite the input model")
            if not out.parent.is_dir():
                raise CalibrationError(f"{out}: output directory {out.parent} does not exist")
            probe = out.with_name(f".{out.name}.tmp")  # (the name _write_variant writes first)
            try:  # before the calibration's minutes, not after them, blamed on the model
                probe.touch()
                probe.unlink()
            except OSError as e:
                raise CalibrationError(f"{out}: cannot write ({e.strerror or e})") from e
    if out_int8 is not None and not args.source:
        raise CalibrationError(f"{model}: INT8 calibration needs --source (a video or an image directory)")
    card = load_model_card(model)
    sources = [probe_source(s) for s in args.source]  # every source is checked before anything is written
    if out_int8 is not None:
        frames = list(calibration_frames(sources, args.frames))
        try:
            found = confident_detections(model, card, frames)
        except EngineError as e:
            raise CalibrationError(str(e)) from e
        warning = coverage_warning(card, len(frames), found, args.source)
        if warning is not None:
            print(f"warning: {warning}", file=sys.stderr)
        details = _write_variant(
            out_int8, card,
            lambda tmp: quantize_int8(model, tmp, frames=iter(frames), card=card, method=args.method,
                                      per_channel=not args.per_tensor, target=args.target),
            precision=OutputPrecision.INT8, model=model, command=command)
        print(f"wrote {out_int8} (int8 Q/DQ for {args.target.value}, {details['frames']} calibration frames, "
              f"{details['fp32_nodes']} head nodes in fp32)")
    if out_fp16 is not None:
        details = _write_variant(out_fp16, card, lambda tmp: convert_fp16(model, tmp),
                                 precision=OutputPrecision.FP16, model=model, command=command)
        print(f"wrote {out_fp16} (fp16, float32 I/O, {details['fp32_nodes']} head nodes in fp32)")


if __name__ == "__main__":
    raise SystemExit(main())
