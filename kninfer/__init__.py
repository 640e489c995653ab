"""kninfer: Kronecker-compressed GPT-2 models, trained with ILKD, run on onnxruntime."""

__version__ = "0.1.0"
