"""Building deployable models from an FP32 ONNX detector.

:mod:`engines.deploy.calibrate` (CLI ``python -m training.calibrate``) writes INT8 / FP16 variants,
using :mod:`~engines.deploy.frames` (calibration frames), :mod:`~engines.deploy.graph` (ONNX graph
analysis), :mod:`~engines.deploy.quantize` (the conversions) and :mod:`~engines.deploy.cards`
(variant model cards); :mod:`engines.deploy.build_engine` (CLI ``python -m training.build_engine``)
turns an ONNX model into a TensorRT engine file. Nothing here imports PyTorch at import time.
"""
