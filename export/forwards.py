"""Export-time pieces every family's forwards share (docs/architecture.md, "ONNX graph rules"): the mask built once
per graph, head split and merge by constant reshapes, the attention core (traced, or fused into onnxruntime's
GroupQueryAttention / MultiHeadAttention / RotaryEmbedding contrib ops), the tied dense head."""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import nn
from torch.onnx import symbolic_helper

from kninfer.errors import KninferError
from kninfer.kron import reshape_tail

CONTRIB = "com.microsoft"
INT32 = 6  # onnx.TensorProto.INT32


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


class FusedMask(NamedTuple):
    """What the fused attention ops read, built once per graph from `attention_mask` (batch, past+seq)."""

    bias: torch.Tensor  # `causal_mask`: additive (batch, 1, seq, past+seq), the left padding and the causal rule
    seqlens_k: torch.Tensor  # int32 (batch,): past+seq-1 for every row (GroupQueryAttention's "total length - 1")
    total_length: torch.Tensor  # int32 scalar: past+seq


def fused_causal_mask(config, input_embeds: torch.Tensor, attention_mask: torch.Tensor, cache_position: torch.Tensor,
                      **kwargs) -> FusedMask:
    """`causal_mask` with the lengths GroupQueryAttention needs. Every row's length is the mask's width: padding,
    left or right, is hidden by the bias, so the op's own causal rule (key j visible to query i iff j <= past+i)
    agrees with it and the cache stays (batch, kv_heads, past+seq, head_dim) for every row. The queries' positions
    come from the mask's width, not from the past tensors' length (transformers' `cache_position`): no node but
    the attention reads the cache, so it may be a longer buffer written in place (kv_cache.shared_buffer)."""
    width, seq = attention_mask.shape[-1], input_embeds.shape[1]
    positions = torch.arange(width - seq, width, device=attention_mask.device)
    bias = causal_mask(config, input_embeds, attention_mask, positions)
    return FusedMask(bias, *_SequenceLengths.apply(attention_mask))


class _SequenceLengths(torch.autograd.Function):
    """(width-1 for every row, width) of a (batch, width) mask, int32, as Shape -> Gather -> Cast (-> Sub -> Expand):
    the exporter would otherwise trace `mask.shape` to constants or to a Shape chain per use."""

    @staticmethod
    def forward(ctx, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, width = mask.shape
        return (torch.full((batch,), width - 1, dtype=torch.int32, device=mask.device),
                torch.tensor(width, dtype=torch.int32, device=mask.device))

    @staticmethod
    def symbolic(g, mask):
        shape = g.op("Shape", mask)
        total = g.op("Cast", g.op("Gather", shape, g.op("Constant", value_t=torch.tensor(1)), axis_i=0), to_i=INT32)
        last = g.op("Sub", total, g.op("Constant", value_t=torch.tensor(1, dtype=torch.int32)))
        seqlens = g.op("Expand", last, g.op("Gather", shape, g.op("Constant", value_t=torch.tensor([0])), axis_i=0))
        total.setType(mask.type().with_dtype(torch.int32).with_sizes([]))
        seqlens.setType(mask.type().with_dtype(torch.int32).with_sizes([None]))
        return seqlens, total


def fused_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cache, layer_idx: int,
                    mask: FusedMask, num_heads: int, kv_heads: int, scale: float,
                    op: str = "GroupQueryAttention") -> torch.Tensor:
    """softmax(q·kᵀ·scale + mask.bias)·v as one onnxruntime contrib node, on the projections as they come out of
    their MatMuls: query (batch, seq, heads·head_dim), key and value (batch, seq, kv_heads·head_dim). Layer
    `layer_idx` of `cache` (a DynamicCache, or None), (batch, kv_heads, past, head_dim), is read and replaced by the
    node's present key and value (past+seq). Returns the output (batch, seq, heads·head_dim). `op`:
    GroupQueryAttention (any kv_heads dividing heads; a step of several tokens after a cache then needs batch 1) or
    MultiHeadAttention (kv_heads == heads)."""
    if not isinstance(mask, FusedMask):
        raise KninferError("fused attention needs the FusedMask of `fused_causal_mask` (a patched mask function)")
    if op not in _FUSED_OPS or (op == "MultiHeadAttention" and kv_heads != num_heads):
        raise KninferError(f"no fused attention op {op!r} for {num_heads} query heads and {kv_heads} KV heads")
    layer = cache_layer(cache, layer_idx)
    past_key, past_value = (None, None) if layer is None else (layer.keys, layer.values)
    output, present_key, present_value = _FUSED_OPS[op].apply(query, key, value, past_key, past_value,
                                                              mask.seqlens_k, mask.total_length, mask.bias,
                                                              num_heads, kv_heads, scale)
    if layer is not None:
        layer.keys, layer.values = present_key, present_value
    return output


def _reference_attention(query, key, value, past_key, past_value, bias, num_heads, kv_heads, scale):
    """What both fused ops compute, in plain torch (inside a Function's forward: no nested Functions)."""
    batch, seq, width = query.shape
    head_dim = width // num_heads
    query, key, value = (t.reshape(batch, seq, -1, head_dim).transpose(1, 2) for t in (query, key, value))
    if past_key is not None:
        key, value = torch.cat([past_key, key], dim=2), torch.cat([past_value, value], dim=2)
    groups = num_heads // kv_heads
    heads = attend(query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1), bias, scale)
    return heads.transpose(1, 2).reshape(batch, seq, width), key, value


def _fused_types(outputs, query, num_heads: int, kv_heads: int):
    """Output types for the exporter (onnx shape inference does not know the contrib ops)."""
    output, present_key, present_value = outputs
    output.setType(query.type())
    width = symbolic_helper._get_tensor_dim_size(query, 2)
    cache = query.type().with_sizes([None, kv_heads, None, None if width is None else width // num_heads])
    present_key.setType(cache)
    present_value.setType(cache)
    return output, present_key, present_value


def _optional(g, value):
    return symbolic_helper._optional_input_placeholder_tensor(g) if symbolic_helper._is_none(value) else value


class _FusedAttention(torch.autograd.Function):
    """The attention core as one contrib node; `forward` is what the node computes, in torch."""

    @staticmethod
    def forward(ctx, query, key, value, past_key, past_value, seqlens_k, total_length, bias, num_heads, kv_heads,
                scale):
        return _reference_attention(query, key, value, past_key, past_value, bias, num_heads, kv_heads, scale)


class _GroupQueryAttention(_FusedAttention):
    """com.microsoft.GroupQueryAttention: rotary already applied, the mask as attention_bias."""

    @staticmethod
    def symbolic(g, query, key, value, past_key, past_value, seqlens_k, total_length, bias, num_heads, kv_heads,
                 scale):
        none = symbolic_helper._optional_input_placeholder_tensor(g)  # cos_cache, sin_cache, position_ids
        outputs = g.op(f"{CONTRIB}::GroupQueryAttention", query, key, value, _optional(g, past_key),
                       _optional(g, past_value), seqlens_k, total_length, none, none, none, bias,
                       num_heads_i=num_heads, kv_num_heads_i=kv_heads, scale_f=scale, outputs=3)
        return _fused_types(outputs, query, num_heads, kv_heads)


class _MultiHeadAttention(_FusedAttention):
    """com.microsoft.MultiHeadAttention (as many KV heads as query heads): the mask as attention_bias."""

    @staticmethod
    def symbolic(g, query, key, value, past_key, past_value, seqlens_k, total_length, bias, num_heads, kv_heads,
                 scale):
        none = symbolic_helper._optional_input_placeholder_tensor(g)  # bias, key_padding_mask
        outputs = g.op(f"{CONTRIB}::MultiHeadAttention", query, key, value, none, none, bias, _optional(g, past_key),
                       _optional(g, past_value), num_heads_i=num_heads, scale_f=scale, outputs=3)
        return _fused_types(outputs, query, num_heads, kv_heads)


_FUSED_OPS = {"GroupQueryAttention": _GroupQueryAttention, "MultiHeadAttention": _MultiHeadAttention}


class _RotaryEmbedding(torch.autograd.Function):
    """com.microsoft.RotaryEmbedding (non-interleaved, as Llama's rotate_half) on (batch, seq, heads·head_dim), the
    angles looked up per token in (positions, head_dim/2) cos and sin tables."""

    @staticmethod
    def forward(ctx, x, position_ids, cos_table, sin_table):
        half = cos_table.shape[-1]
        heads = x.reshape(*x.shape[:2], -1, 2 * half)
        cos, sin = cos_table[position_ids][:, :, None, :], sin_table[position_ids][:, :, None, :]
        first, second = heads[..., :half], heads[..., half:]
        return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1).reshape(x.shape)

    @staticmethod
    def symbolic(g, x, position_ids, cos_table, sin_table):
        out = g.op(f"{CONTRIB}::RotaryEmbedding", x, position_ids, cos_table, sin_table)
        out.setType(x.type())
        return out


def rotary_embedding(x: torch.Tensor, position_ids: torch.Tensor, cos_table: torch.Tensor,
                     sin_table: torch.Tensor) -> torch.Tensor:
    """x·cos + rotate_half(x)·sin per head of x (batch, seq, heads·head_dim) at `position_ids` (batch, seq), one
    RotaryEmbedding node; the tables are (positions, head_dim/2)."""
    return _RotaryEmbedding.apply(x, position_ids, cos_table, sin_table)


def cache_layer(cache, layer_idx: int):
    """The DynamicCache layer (its `keys` and `values`) that the fused op reads and replaces; None without a cache."""
    if cache is None:
        return None
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers) or not hasattr(layers[layer_idx], "keys"):
        raise KninferError(f"fused attention cannot read this {type(cache).__name__} (layer {layer_idx}): "
                           "export with --no-fused-attention")
    return layers[layer_idx]


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
