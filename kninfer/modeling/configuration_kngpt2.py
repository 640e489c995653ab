"""KnGPT2Config: a GPT2Config plus the Kronecker spec (module path -> factor shapes)."""

from __future__ import annotations

from typing import Any

from transformers import GPT2Config

from kninfer.errors import KninferError
from kninfer.kron import check_positive

FACTORS = ("m1", "n1", "m2", "n2", "rank")


class KnGPT2Config(GPT2Config):
    """GPT-2 with chosen weights stored as Kronecker factors.

    `kronecker = {"modules": {path: {"m1", "n1", "m2", "n2", "rank"}}, "tie_head": bool}`, paths as in
    the model (`transformer.wte`, `transformer.h.1.attn.c_attn.q`, `transformer.h.1.mlp.c_fc`, ...).
    With a Kronecker `transformer.wte`, `tie_head` makes the LM head reuse its factors; otherwise the
    head is a separate dense matrix, as in the KnGPT2 paper.
    """

    model_type = "kngpt2"

    def __init__(self, kronecker: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if kronecker is not None:
            check_spec(kronecker)
        self.kronecker = kronecker or {"modules": {}, "tie_head": False}
        if "transformer.wte" in self.kronecker["modules"]:
            kwargs["tie_word_embeddings"] = False  # the Kronecker head is tied by KroneckerEmbedding itself
        super().__init__(**kwargs)


def check_spec(spec: Any) -> None:
    """Raise a one-line error unless `spec` has KnGPT2Config's `kronecker` layout with positive integer factors."""
    if not isinstance(spec, dict) or not isinstance(spec.get("modules"), dict):
        raise KninferError('the "kronecker" spec must be an object with a "modules" object')
    if not isinstance(spec.get("tie_head", False), bool):
        raise KninferError(f'the "kronecker" spec\'s "tie_head" must be true or false, got {spec["tie_head"]!r}')
    for path, entry in spec["modules"].items():
        if not isinstance(entry, dict) or any(key not in entry for key in FACTORS):
            raise KninferError(f"kronecker spec '{path}': needs {', '.join(FACTORS)}, got {entry!r}")
        try:
            check_positive(**{key: entry[key] for key in FACTORS})
        except KninferError as error:
            raise KninferError(f"kronecker spec '{path}': {error}") from None
