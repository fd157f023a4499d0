"""Execution backends for the exported stages: TensorRT, ONNX Runtime, eager torch."""
