"""Encoders: the vision and audio modules, their ONNX and PyTorch runtimes, and request batching."""
