"""Kronecker students: a family's transformers model with the modules named in its config's spec swapped for
Kronecker layers (KnGPT2 and KnLlama, causal LM and sequence classifier)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaModel,
)
from transformers.pytorch_utils import Conv1D

from kninfer.errors import KninferError
from kninfer.kron import KroneckerEmbedding, KroneckerLinear
from kninfer.modeling.configuration_kronecker import KnGPT2Config, KnLlamaConfig, KroneckerSpec
from kninfer.modeling.families import family_of, weight_shapes


class TiedKroneckerHead(nn.Module):
    """LM head that reuses the Kronecker embedding's factors: logits = A @ (H @ Bᵀ), E never formed."""

    def __init__(self, embedding: KroneckerEmbedding) -> None:
        super().__init__()
        self._embedding = (embedding,)  # a tuple keeps the shared factors out of this module's parameters

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._embedding[0].attend(hidden)


def apply_kronecker(model: nn.Module, spec: KroneckerSpec) -> None:
    """Swap every module named in `spec` for a freshly initialised Kronecker layer of the dense module's shape."""
    family = family_of(model.config)
    shapes = weight_shapes(model)
    for path, factors in spec.modules.items():
        if path not in shapes:
            raise KninferError(f"'{path}' is not a factorable module of this {family.name} model "
                               "(see `kninfer info`)")
        out_features, in_features = shapes[path]
        if path == family.embedding:
            if factors.m2 != 1 or factors.m1 != out_features:
                raise KninferError(f"the embedding's B must be (1, f), got ({factors.m2}, {factors.n2})")
            layer = KroneckerEmbedding(out_features, in_features, factors.n2, factors.rank)
        else:
            if family.prepare is not None:
                family.prepare(model, path)
            dense = model.get_submodule(path)
            layer = KroneckerLinear(in_features, out_features, factors.m1, factors.n1, factors.m2, factors.n2,
                                    factors.rank, bias=isinstance(dense, Conv1D) or dense.bias is not None)
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, layer)


class KroneckerModel:
    """Mixin for a family's model class: Kronecker layers from the config's spec, a tied Kronecker head on request."""

    _tied_weights_keys: list[str] = []

    def __init__(self, config: KnGPT2Config | KnLlamaConfig) -> None:
        super().__init__(config)
        apply_kronecker(self, config.kronecker)
        embedding = self.get_input_embeddings()
        if isinstance(embedding, KroneckerEmbedding):
            if config.kronecker.tie_head and hasattr(self, "lm_head"):
                self.lm_head = TiedKroneckerHead(embedding)
        elif hasattr(self, "lm_head"):
            self._tied_weights_keys = ["lm_head.weight"]
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Kronecker layers as the family initialises its dense ones (entries of W with initializer_range)."""
        if isinstance(module, (KroneckerLinear, KroneckerEmbedding)):
            module.reset_parameters(self.config.initializer_range)
        else:
            super()._init_weights(module)


class KnGPT2LMHeadModel(KroneckerModel, GPT2LMHeadModel):
    """GPT-2 causal LM with Kronecker layers."""

    config_class = KnGPT2Config


class KnGPT2ForSequenceClassification(KroneckerModel, GPT2ForSequenceClassification):
    """GPT-2 sequence classifier (last non-pad token pooled) with Kronecker layers."""

    config_class = KnGPT2Config


class KnLlamaForCausalLM(KroneckerModel, LlamaForCausalLM):
    """Llama causal LM with Kronecker layers."""

    config_class = KnLlamaConfig


class KnLlamaModel(LlamaModel):
    """The body transformers' Llama sequence classifier builds through AutoModel: plain Llama, into which
    KnLlamaForSequenceClassification then swaps the spec's Kronecker layers (the spec's paths start at it)."""

    config_class = KnLlamaConfig


class KnLlamaForSequenceClassification(KroneckerModel, LlamaForSequenceClassification):
    """Llama sequence classifier (last non-pad token pooled) with Kronecker layers."""

    config_class = KnLlamaConfig
