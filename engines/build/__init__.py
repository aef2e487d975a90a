"""Building deployable models from an FP32 ONNX detector.

:mod:`engines.build.calibrate` (CLI ``python -m training.calibrate``) writes INT8 / FP16 variants,
using :mod:`~engines.build.frames` (calibration frames), :mod:`~engines.build.graph` (ONNX graph
analysis), :mod:`~engines.build.quantize` (the conversions) and :mod:`~engines.build.cards`
(variant model cards); :mod:`engines.build.build_engine` (CLI ``python -m training.build_engine``)
turns an ONNX model into a TensorRT engine file. Nothing here imports PyTorch at import time.
"""
