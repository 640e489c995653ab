"""Model families as data: where each transformers architecture keeps the weights kninfer may factor.

A family names its token embedding, its list of blocks and, inside a block, the attention and MLP maps; shapes are
read from the built model, never from formulas. GPT-2 adds one hook: its fused c_attn is split into q, k, v so that
each can be factored (kninfer/modeling/gpt2.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.pytorch_utils import Conv1D

from kninfer.errors import KninferError
from kninfer.modeling import gpt2


@dataclass(frozen=True)
class Family:
    """One architecture: its transformers classes, module paths, and the model_type of its Kronecker students."""

    name: str
    config_class: type[PretrainedConfig]
    causal_lm: type[PreTrainedModel]
    classifier: type[PreTrainedModel]
    student_type: str
    embedding: str
    layers: str
    attention: tuple[str, ...]  # factorable maps of a block, relative to it
    mlp: tuple[str, ...]
    prepare: Callable[[nn.Module, str], None] | None = None  # makes a factorable path a module of its own

    def block(self, index: int) -> str:
        """The path of block `index`."""
        return f"{self.layers}.{index}"

    def factorable_paths(self, num_layers: int) -> list[str]:
        """Every module path that may become a Kronecker layer: the embedding, then each block's maps."""
        return [self.embedding] + [f"{self.block(i)}.{name}" for i in range(num_layers)
                                   for name in (*self.attention, *self.mlp)]


GPT2 = Family("gpt2", GPT2Config, GPT2LMHeadModel, GPT2ForSequenceClassification, "kngpt2", "transformer.wte",
              "transformer.h", ("attn.c_attn.q", "attn.c_attn.k", "attn.c_attn.v", "attn.c_proj"),
              ("mlp.c_fc", "mlp.c_proj"), gpt2.split_qkv)
LLAMA = Family("llama", LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, "knllama",
               "model.embed_tokens", "model.layers",
               ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
               ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
FAMILIES = {family.name: family for family in (GPT2, LLAMA)}
MODEL_TYPES = {key: family for family in FAMILIES.values() for key in (family.name, family.student_type)}


def family_of(config: PretrainedConfig) -> Family:
    """The family of a dense or Kronecker config."""
    try:
        return MODEL_TYPES[config.model_type]
    except KeyError:
        raise KninferError(f"model_type '{config.model_type}' is not supported: kninfer handles the "
                           f"{' and '.join(FAMILIES)} families") from None


@dataclass(frozen=True)
class Dims:
    """A config's sizes under one set of names, whatever the family calls them."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    context: int


def dims(config: PretrainedConfig) -> Dims:
    """The sizes of a GPT-2 or Llama config (GPT2Config maps the generic names through its attribute_map)."""
    heads = config.num_attention_heads
    return Dims(layers=config.num_hidden_layers, hidden=config.hidden_size, heads=heads,
                kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                vocab=config.vocab_size, context=config.max_position_embeddings)


def weight_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Every factorable module path of `model` with its (out, in) shape, read from the built modules."""
    family = family_of(model.config)
    return {path: weight_shape(model, path) for path in family.factorable_paths(dims(model.config).layers)}


def weight_shape(model: nn.Module, path: str) -> tuple[int, int]:
    """The (out, in) shape of the weight at `path` (embeddings: (vocab, width)), without materialising it."""
    fused = gpt2.fused_part(model, path)
    if fused is not None:
        return fused
    module = model.get_submodule(path)
    if isinstance(module, Conv1D):
        return tuple(module.weight.shape[::-1])
    if isinstance(module, (nn.Linear, nn.Embedding)):
        return tuple(module.weight.shape)
    if hasattr(module, "out_features"):  # KroneckerLinear
        return module.out_features, module.in_features
    if hasattr(module, "num_embeddings"):  # KroneckerEmbedding
        return module.num_embeddings, module.embedding_dim
    raise KninferError(f"module '{path}' ({type(module).__name__}) has no weight matrix")


def input_module(model: nn.Module, path: str) -> nn.Module:
    """The module whose input is the map's input: the map itself, or the fused c_attn that holds GPT-2's q, k or v."""
    return gpt2.fused_module(model, path) or model.get_submodule(path)


def dense_weight(model: nn.Module, path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (out, in) weight and bias at `path`: Conv1D transposed, Kronecker layers materialised, GPT-2's q/k/v
    sliced out of a fused c_attn, and a split c_attn concatenated back."""
    sliced = gpt2.fused_weight(model, path, dense_weight)
    if sliced is not None:
        return sliced
    module = model.get_submodule(path)
    if isinstance(module, Conv1D):
        return module.weight.T, module.bias
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    if isinstance(module, nn.Embedding):
        return module.weight, None
    if hasattr(module, "to_dense"):
        return module.to_dense(), getattr(module, "bias", None)
    raise KninferError(f"module '{path}' ({type(module).__name__}) has no dense weight")


@torch.no_grad()
def set_dense_weight(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Store an (out, in) weight and bias in a dense module, in its own layout (Conv1D keeps (in, out))."""
    module.weight.copy_(weight.T if isinstance(module, Conv1D) else weight)
    if getattr(module, "bias", None) is not None and bias is not None:
        module.bias.copy_(bias)
