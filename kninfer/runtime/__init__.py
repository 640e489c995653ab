"""The torch-free runtime: bundles on onnxruntime (numpy, onnxruntime, tokenizers only; a test checks it).

`load`, `LanguageModel` and `TextClassifier` come from `kninfer.runtime.model` on first use, so that importing a
light module of the package (`tasks`, `bundle`) does not import onnxruntime.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kninfer.runtime.model import LanguageModel, TextClassifier, load

__all__ = ["LanguageModel", "TextClassifier", "load"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("kninfer.runtime.model"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
