"""The Kronecker spec (module path -> factor shapes) and the configs of Kronecker students: a family's config plus
the spec, serialised into config.json as `"kronecker": {"modules": {path: {m1, n1, m2, n2, rank}}, "tie_head": ..}`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from transformers import GPT2Config, LlamaConfig

from kninfer.errors import KninferError
from kninfer.kron import FactorShape, check_positive
from kninfer.modeling.families import family_of

FACTORS = tuple(f.name for f in dataclasses.fields(FactorShape))


@dataclass(frozen=True)
class KroneckerSpec:
    """Which modules are Kronecker layers and with which factor shapes; `tie_head`: with a Kronecker embedding, the
    LM head reuses its factors (otherwise the head is a separate dense matrix, as in the KnGPT2 paper)."""

    modules: Mapping[str, FactorShape] = field(default_factory=dict)
    tie_head: bool = False

    @classmethod
    def from_dict(cls, data: Any) -> KroneckerSpec:
        """The spec of config.json's `kronecker` object, checked: positive integer factors, a boolean tie_head."""
        if not isinstance(data, dict) or not isinstance(data.get("modules"), dict):
            raise KninferError('the "kronecker" spec must be an object with a "modules" object')
        tie_head = data.get("tie_head", False)
        if not isinstance(tie_head, bool):
            raise KninferError(f'the "kronecker" spec\'s "tie_head" must be true or false, got {tie_head!r}')
        modules = {}
        for path, entry in data["modules"].items():
            if not isinstance(entry, dict) or any(key not in entry for key in FACTORS):
                raise KninferError(f"kronecker spec '{path}': needs {', '.join(FACTORS)}, got {entry!r}")
            try:
                check_positive(**{key: entry[key] for key in FACTORS})
            except KninferError as error:
                raise KninferError(f"kronecker spec '{path}': {error}") from None
            modules[path] = FactorShape(**{key: entry[key] for key in FACTORS})
        return cls(modules, tie_head)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form that from_dict reads."""
        return {"modules": {path: dataclasses.asdict(shape) for path, shape in self.modules.items()},
                "tie_head": self.tie_head}


class KroneckerConfig:
    """Mixin for a family's config: the `kronecker` spec, kept as a KroneckerSpec and written as its dict."""

    def __init__(self, kronecker: KroneckerSpec | dict[str, Any] | None = None, **kwargs: Any) -> None:
        spec = kronecker if isinstance(kronecker, KroneckerSpec) else KroneckerSpec.from_dict(
            kronecker or {"modules": {}})
        if family_of(self).embedding in spec.modules:
            kwargs["tie_word_embeddings"] = False  # a Kronecker head is tied by KroneckerEmbedding itself
        super().__init__(**kwargs)
        self.kronecker = spec

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output["kronecker"] = self.kronecker.to_dict()
        return output


class KnGPT2Config(KroneckerConfig, GPT2Config):
    """GPT-2 with chosen weights stored as Kronecker factors (paths such as `transformer.h.1.attn.c_attn.q`)."""

    model_type = "kngpt2"


class KnLlamaConfig(KroneckerConfig, LlamaConfig):
    """Llama with chosen weights stored as Kronecker factors (paths such as `model.layers.1.mlp.gate_proj`)."""

    model_type = "knllama"
