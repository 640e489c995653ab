"""Export-time forwards for GPT-2's blocks with constant reshape targets (docs/architecture.md, "ONNX graph rules").

transformers' attention, mask and Conv1D code size their reshapes from `x.size()`, which traces to
Shape -> Gather -> Unsqueeze -> Concat chains in every layer. These replacements compute the same values
with constant targets and build the causal + padding mask once per graph; optimum's patcher swaps them in
for the duration of the export only.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from optimum.exporters.onnx.model_patcher import PatchingSpec
from torch import nn
from transformers.models.gpt2 import modeling_gpt2
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention
from transformers.pytorch_utils import Conv1D

from kninfer.kron import reshape_tail
from kninfer.modeling.gpt2 import SplitQKV


def causal_mask(config, input_embeds: torch.Tensor, attention_mask: torch.Tensor, cache_position: torch.Tensor,
                past_key_values=None, position_ids=None, **kwargs) -> torch.Tensor:
    """Additive (batch, 1, seq, past+seq) mask: key j is visible to query i iff j <= cache_position[i] and
    attention_mask[:, j] is 1; hidden entries hold the dtype's finite minimum (a fully padded row stays finite)."""
    keys = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    visible = (keys <= cache_position[:, None]) & attention_mask[:, None, None, :].bool()
    hidden = torch.tensor(torch.finfo(input_embeds.dtype).min, dtype=input_embeds.dtype)
    return torch.where(visible, torch.zeros((), dtype=input_embeds.dtype), hidden)


def attention_forward(self: GPT2Attention, hidden_states: torch.Tensor, past_key_values=None, cache_position=None,
                      attention_mask: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """GPT-2 self-attention: heads split by Reshape [0, 0, -1, head_dim], the mask added as given."""
    query, key, value = (_split_heads(t, self.head_dim) for t in _qkv(self, hidden_states))
    if past_key_values is not None:
        key, value = past_key_values.update(key, value, self.layer_idx)
    scores = torch.matmul(query, key.transpose(-1, -2)) * _scale(self)
    if attention_mask is not None:
        scores = scores + attention_mask
    heads = torch.matmul(scores.softmax(-1), value).transpose(1, 2)
    return self.resid_dropout(self.c_proj(reshape_tail(heads, 2, (self.embed_dim,)))), None


def conv1d_forward(self: Conv1D, x: torch.Tensor) -> torch.Tensor:
    """x @ W + b as MatMul + Add: no flatten to 2-D and back."""
    return torch.matmul(x, self.weight) + self.bias


class _SharedTableHead(torch.autograd.Function):
    """hidden @ Wᵀ as Reshape -> Gemm(transB=1) on W itself -> Reshape back: torch's exporter would fold Wᵀ into a
    second initializer, and `unflatten` traces to a long Shape chain."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return hidden @ weight.T

    @staticmethod
    def symbolic(g, hidden, weight):
        width = weight.type().sizes()[1]
        flat = g.op("Reshape", hidden, g.op("Constant", value_t=torch.tensor([-1, width])))
        logits = g.op("Gemm", flat, weight, transB_i=1)
        target = g.op("Concat", g.op("Shape", hidden, end_i=-1), g.op("Constant", value_t=torch.tensor([-1])), axis_i=0)
        return g.op("Reshape", logits, target)


def shared_table_head(self: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """A head tied to the embedding, reading the embedding's own initializer."""
    return _SharedTableHead.apply(hidden, self.weight)


def patching_specs() -> list[PatchingSpec]:
    """The swaps for optimum's ModelPatcher (a fresh list: the patcher extends it in place)."""
    return [PatchingSpec(modeling_gpt2, "create_causal_mask", causal_mask),
            PatchingSpec(GPT2Attention, "forward", attention_forward), PatchingSpec(Conv1D, "forward", conv1d_forward)]


@contextmanager
def tied_head_reads_embedding(model: nn.Module) -> Iterator[None]:
    """Within: an nn.Linear head tied to the embedding runs as `shared_table_head`; elsewhere nothing changes."""
    head = getattr(model, "lm_head", None)
    tied = isinstance(head, nn.Linear) and head.weight is getattr(model.get_input_embeddings(), "weight", None)
    if tied:
        head.forward = types.MethodType(shared_table_head, head)
    try:
        yield
    finally:
        if tied:
            del head.forward


def _qkv(attn: GPT2Attention, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    if isinstance(attn.c_attn, SplitQKV):  # separately factored q/k/v: no Concat then Split
        return attn.c_attn.q(x), attn.c_attn.k(x), attn.c_attn.v(x)
    return attn.c_attn(x).split(attn.split_size, dim=2)


def _split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return reshape_tail(x, 1, (-1, head_dim)).transpose(1, 2)


def _scale(attn: GPT2Attention) -> float:
    scale = attn.head_dim**-0.5 if attn.scale_attn_weights else 1.0
    return scale / (attn.layer_idx + 1) if attn.scale_attn_by_inverse_layer_idx else scale
