"""kninfer: Kronecker-compressed GPT-2 models, trained with ILKD, run on onnxruntime.

`kninfer.load(path)` runs an exported bundle (see `kninfer.runtime`); it is imported on first use, so that
`import kninfer` stays light (no onnxruntime, no torch).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kninfer.runtime import LanguageModel, TextClassifier, load

__version__ = "0.1.0"
__all__ = ["LanguageModel", "TextClassifier", "load"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("kninfer.runtime"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
