"""The deployment tools as subcommands, shared by the ``streamdet`` and ``streamdet-train`` commands.

Each tool is imported when its subcommand runs, not with the command: ``streamdet run`` does not
pay for the calibration and engine-building modules (about 0.5 s of imports).
"""

from __future__ import annotations

from streamdet.cli import Subcommand


def _calibrate(argv: list[str]) -> int:
    from engines.deploy import calibrate

    return calibrate.main(argv)


def _build_engine(argv: list[str]) -> int:
    from engines.deploy import build_engine

    return build_engine.main(argv)


CALIBRATE = Subcommand("calibrate", "INT8 / FP16 variants of an ONNX model (python -m training.calibrate)",
                       _calibrate)
"""``calibrate``: :mod:`engines.deploy.calibrate`."""

BUILD_ENGINE = Subcommand("build-engine", "a TensorRT engine file from an ONNX model (python -m training.build_engine)",
                          _build_engine)
"""``build-engine``: :mod:`engines.deploy.build_engine`."""
