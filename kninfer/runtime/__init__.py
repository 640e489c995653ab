"""The torch-free runtime: bundles on onnxruntime (numpy, onnxruntime, tokenizers only; a test checks it)."""
