"""KnGPT2 models: transformers' GPT-2 with the modules named in the config's spec swapped for Kronecker layers."""

from __future__ import annotations

import torch
from torch import nn
from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

from kninfer.errors import KninferError
from kninfer.kron import KroneckerEmbedding, KroneckerLinear
from kninfer.modeling.configuration_kngpt2 import KnGPT2Config
from kninfer.modeling.gpt2 import EMBEDDING, split_qkv, weight_shapes


class TiedKroneckerHead(nn.Module):
    """LM head that reuses the Kronecker embedding's factors: logits = A @ (H @ Bᵀ), E never formed."""

    def __init__(self, embedding: KroneckerEmbedding) -> None:
        super().__init__()
        self._embedding = (embedding,)  # a tuple keeps the shared factors out of this module's parameters

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._embedding[0].attend(hidden)


def apply_kronecker(model: nn.Module, config: KnGPT2Config) -> None:
    """Swap every module named in `config.kronecker["modules"]` for a freshly initialised Kronecker layer."""
    shapes = weight_shapes(config)
    for path, spec in config.kronecker["modules"].items():
        if path not in shapes:
            raise KninferError(f"'{path}' is not a factorable module of this GPT-2 (see `kninfer info`)")
        out_features, in_features = shapes[path]
        factors = {key: spec[key] for key in ("m1", "n1", "m2", "n2")}
        if path == EMBEDDING:
            if factors["m2"] != 1 or factors["m1"] != out_features:
                raise KninferError(f"the embedding's B must be (1, f), got ({factors['m2']}, {factors['n2']})")
            model.transformer.wte = KroneckerEmbedding(out_features, in_features, factors["n2"], spec["rank"])
            continue
        parent, _, name = path.rpartition(".")
        if name in ("q", "k", "v"):
            split_qkv(model, parent.removesuffix(".attn.c_attn"))
        layer = KroneckerLinear(in_features, out_features, **factors, rank=spec["rank"])
        setattr(model.get_submodule(parent), name, layer)


def _init_kronecker(model: nn.Module, module: nn.Module) -> bool:
    """Initialise a Kronecker layer the way GPT-2 initialises dense ones; False for any other module."""
    if isinstance(module, (KroneckerLinear, KroneckerEmbedding)):
        module.reset_parameters(model.config.initializer_range)
        return True
    return False


class KnGPT2LMHeadModel(GPT2LMHeadModel):
    """GPT-2 causal LM with Kronecker layers; a tied Kronecker head when `kronecker.tie_head`."""

    config_class = KnGPT2Config
    _tied_weights_keys: list[str] = []

    def __init__(self, config: KnGPT2Config) -> None:
        super().__init__(config)
        apply_kronecker(self, config)
        if isinstance(self.transformer.wte, KroneckerEmbedding) and config.kronecker.get("tie_head"):
            self.lm_head = TiedKroneckerHead(self.transformer.wte)
        elif not isinstance(self.transformer.wte, KroneckerEmbedding):
            self._tied_weights_keys = ["lm_head.weight"]
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if not _init_kronecker(self, module):
            super()._init_weights(module)


class KnGPT2ForSequenceClassification(GPT2ForSequenceClassification):
    """GPT-2 sequence classifier (last non-pad token pooled) with Kronecker layers."""

    config_class = KnGPT2Config

    def __init__(self, config: KnGPT2Config) -> None:
        super().__init__(config)
        apply_kronecker(self, config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if not _init_kronecker(self, module):
            super()._init_weights(module)
