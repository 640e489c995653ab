"""KnGPT2Config: a GPT2Config plus the Kronecker spec (module path -> factor shapes)."""

from __future__ import annotations

from typing import Any

from transformers import GPT2Config


class KnGPT2Config(GPT2Config):
    """GPT-2 with chosen weights stored as Kronecker factors.

    `kronecker = {"modules": {path: {"m1", "n1", "m2", "n2", "rank"}}, "tie_head": bool}`, paths as in
    the model (`transformer.wte`, `transformer.h.1.attn.c_attn.q`, `transformer.h.1.mlp.c_fc`, ...).
    With a Kronecker `transformer.wte`, `tie_head` makes the LM head reuse its factors; otherwise the
    head is a separate dense matrix, as in the KnGPT2 paper.
    """

    model_type = "kngpt2"

    def __init__(self, kronecker: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.kronecker = kronecker or {"modules": {}, "tie_head": False}
        if "transformer.wte" in self.kronecker["modules"]:
            kwargs["tie_word_embeddings"] = False  # the Kronecker head is tied by KroneckerEmbedding itself
        super().__init__(**kwargs)
