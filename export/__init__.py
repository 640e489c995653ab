"""Export to ONNX (kninfer.export)."""
