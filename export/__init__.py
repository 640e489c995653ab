"""Export to ONNX (kninfer.export): factored Kronecker layers, KV cache, verification, int8, bundle writing."""

from kninfer.export.api import export, read_tokenizer
from kninfer.export.bundle import ExportReport, export_bundle, quantize_bundle

__all__ = ["ExportReport", "export", "export_bundle", "quantize_bundle", "read_tokenizer"]
