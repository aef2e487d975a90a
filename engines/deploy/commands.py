"""The deployment tools as subcommands, shared by the ``streamdet`` and ``streamdet-train`` commands."""

from __future__ import annotations

from engines.deploy import build_engine, calibrate
from streamdet.cli import Subcommand

CALIBRATE = Subcommand("calibrate", "INT8 / FP16 variants of an ONNX model (python -m training.calibrate)",
                       calibrate.main)
"""``calibrate``: :mod:`engines.deploy.calibrate`."""

BUILD_ENGINE = Subcommand("build-engine", "a TensorRT engine file from an ONNX model (python -m training.build_engine)",
                          build_engine.main)
"""``build-engine``: :mod:`engines.deploy.build_engine`."""
