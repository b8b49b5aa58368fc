"""Compressed module -> runnable artifact: ONNX graphs (float, int8 QDQ), packed weights."""
