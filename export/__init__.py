"""Artifact writers: ONNX graphs, GGUF files, quantization and the manifest."""
