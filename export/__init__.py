"""Converters (torch2onnx) and the runtimes that score and time exported artifacts."""
