"""streamdet inference engines (ONNX Runtime on CPU; TensorRT and CUDA backends on NVIDIA GPUs)."""
