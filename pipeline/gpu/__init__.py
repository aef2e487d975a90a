"""Frames on the GPU: CUDA-IPC frame slots, GPU letterbox + normalize, GPU NMS.

Every function here takes a ``device`` (or works on the device of its input tensors), so the
same code runs on CPU tensors in the tests and on CUDA tensors in the pipeline.
"""
