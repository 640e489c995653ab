"""Export-time pieces every family's forwards share (docs/architecture.md, "ONNX graph rules"): the mask built once
per graph, head split and merge by constant reshapes, the attention core, the tied dense head."""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from kninfer.kron import reshape_tail


def causal_mask(config, input_embeds: torch.Tensor, attention_mask: torch.Tensor, cache_position: torch.Tensor,
                past_key_values=None, position_ids=None, **kwargs) -> torch.Tensor:
    """Additive (batch, 1, seq, past+seq) mask: key j is visible to query i iff j <= cache_position[i] and
    attention_mask[:, j] is 1; hidden entries hold the dtype's finite minimum (a fully padded row stays finite)."""
    keys = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    visible = (keys <= cache_position[:, None]) & attention_mask[:, None, None, :].bool()
    hidden = torch.tensor(torch.finfo(input_embeds.dtype).min, dtype=input_embeds.dtype)
    return torch.where(visible, torch.zeros((), dtype=input_embeds.dtype), hidden)


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(batch, seq, heads·head_dim) -> (batch, heads, seq, head_dim) by Reshape [0, 0, -1, head_dim]."""
    return reshape_tail(x, 1, (-1, head_dim)).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(batch, heads, seq, head_dim) -> (batch, seq, heads·head_dim) by Reshape [0, 0, -1]."""
    return reshape_tail(x.transpose(1, 2), 2, (-1,))


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
           scale: float) -> torch.Tensor:
    """softmax(query · keyᵀ · scale + mask) · value, as transformers' eager attention computes it."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + mask
    return torch.matmul(scores.softmax(-1), value)


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
