"""Export-time forwards for Llama's blocks (GQA, RoPE) with constant reshape targets (docs/architecture.md,
"ONNX graph rules").

Grouped-query attention without repeating K/V: the query heads that share a KV head are stacked along the sequence
axis, (batch, heads, seq, head_dim) -> (batch, kv_heads, groups·seq, head_dim), so each KV head is read once by one
MatMul; the mask, built once per graph, has its rows repeated to match. cos and sin are computed once per graph
with the head axis already in place. The projections are called as modules, so Kronecker layers trace factored.

Fused (the default, `patching_specs(fused=True)`): each layer's rotary is two com.microsoft.RotaryEmbedding nodes
(cos and sin tables of every position, made once per graph, looked up at `position_ids`) and its attention core one
com.microsoft.GroupQueryAttention on the projections as they are, (batch, seq, heads·head_dim), with the cache
(batch, kv_heads, past, head_dim) in and out and the mask as its attention_bias.
"""

from __future__ import annotations

import torch
from optimum.exporters.onnx.model_patcher import PatchingSpec
from transformers import LlamaConfig
from transformers.models.llama import modeling_llama
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

from kninfer.errors import KninferError
from kninfer.export.forwards import (
    attend,
    causal_mask,
    fused_attention,
    fused_causal_mask,
    merge_heads,
    rotary_embedding,
    split_heads,
)
from kninfer.kron import reshape_tail


def grouped_causal_mask(config: LlamaConfig, input_embeds: torch.Tensor, attention_mask: torch.Tensor,
                        cache_position: torch.Tensor, **kwargs) -> torch.Tensor:
    """`causal_mask` with its rows repeated once per query head of a group: (batch, 1, groups·seq, past+seq)."""
    mask = causal_mask(config, input_embeds, attention_mask, cache_position)
    return torch.cat([mask] * (config.num_attention_heads // config.num_key_value_heads), dim=2)


def rotary_forward(self: LlamaRotaryEmbedding, x: torch.Tensor,
                   position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position_ids · inv_freq as transformers computes them, shaped (batch, 1, seq, head_dim)."""
    _check_rope(self)
    freqs = position_ids[:, None, :, None].float() * self.inv_freq  # the same products as transformers' matmul
    angles = torch.cat((freqs, freqs), dim=-1)
    return (angles.cos() * self.attention_scaling).to(x.dtype), (angles.sin() * self.attention_scaling).to(x.dtype)


def attention_forward(self: LlamaAttention, hidden_states: torch.Tensor,
                      position_embeddings: tuple[torch.Tensor, torch.Tensor], attention_mask: torch.Tensor | None,
                      past_key_values=None, cache_position=None, **kwargs) -> tuple[torch.Tensor, None]:
    """Llama self-attention on `grouped_causal_mask`'s mask and `rotary_forward`'s cos and sin."""
    cos, sin = position_embeddings
    query, key, value = (split_heads(proj(hidden_states), self.head_dim)
                         for proj in (self.q_proj, self.k_proj, self.v_proj))
    query, key = (_rotate(x, cos, sin, self.head_dim // 2) for x in (query, key))
    if past_key_values is not None:
        key, value = past_key_values.update(key, value, self.layer_idx)
    heads, kv_heads = self.config.num_attention_heads, self.config.num_key_value_heads
    grouped = attend(reshape_tail(query, 3, (kv_heads, -1, self.head_dim)), key, value, attention_mask, self.scaling)
    return self.o_proj(merge_heads(reshape_tail(grouped, 3, (heads, -1, self.head_dim)))), None


def fused_rotary_forward(self: LlamaRotaryEmbedding, x: torch.Tensor,
                         position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RotaryEmbedding's inputs: cos and sin tables (positions, head_dim/2) of every position up to the context,
    the same products position · inv_freq as transformers', and `position_ids` with a row per sequence."""
    _check_rope(self)
    positions = torch.arange(self.max_seq_len_cached, dtype=torch.float32, device=x.device)
    freqs = positions[:, None] * self.inv_freq.float()[None, :]
    if position_ids.shape[0] != x.shape[0]:  # a classifier's positions are cache_position.unsqueeze(0)
        position_ids = position_ids.expand(x.shape[0], -1)
    return ((freqs.cos() * self.attention_scaling).to(x.dtype), (freqs.sin() * self.attention_scaling).to(x.dtype),
            position_ids)


def fused_attention_forward(self: LlamaAttention, hidden_states: torch.Tensor,
                            position_embeddings: tuple[torch.Tensor, torch.Tensor, torch.Tensor], attention_mask,
                            past_key_values=None, **kwargs) -> tuple[torch.Tensor, None]:
    """Llama self-attention as RotaryEmbedding (queries, keys) + GroupQueryAttention, on `fused_causal_mask`'s
    mask and `fused_rotary_forward`'s tables; the layer's cache is replaced by the op's present key and value."""
    cos, sin, position_ids = position_embeddings
    query, key = (rotary_embedding(proj(hidden_states), position_ids, cos, sin) for proj in (self.q_proj, self.k_proj))
    output = fused_attention(query, key, self.v_proj(hidden_states), past_key_values, self.layer_idx, attention_mask,
                             self.config.num_attention_heads, self.config.num_key_value_heads, self.scaling)
    return self.o_proj(output), None


def patching_specs(fused: bool = True) -> list[PatchingSpec]:
    """The swaps for optimum's ModelPatcher (a fresh list: the patcher extends it in place); `fused`: rotary and
    attention as onnxruntime contrib ops."""
    if fused:
        return [PatchingSpec(modeling_llama, "create_causal_mask", fused_causal_mask),
                PatchingSpec(LlamaRotaryEmbedding, "forward", fused_rotary_forward),
                PatchingSpec(LlamaAttention, "forward", fused_attention_forward)]
    return [PatchingSpec(modeling_llama, "create_causal_mask", grouped_causal_mask),
            PatchingSpec(LlamaRotaryEmbedding, "forward", rotary_forward),
            PatchingSpec(LlamaAttention, "forward", attention_forward)]


def _check_rope(rotary: LlamaRotaryEmbedding) -> None:
    if "dynamic" in rotary.rope_type or rotary.rope_type == "longrope":  # inv_freq depends on the length
        raise KninferError(f"RoPE type '{rotary.rope_type}' cannot be exported: its frequencies change with length")


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, half: int) -> torch.Tensor:
    """x·cos + rotate_half(x)·sin, the halves cut at a constant index (no Shape chain)."""
    first, second = x[..., :half], x[..., half:]
    return x * cos + torch.cat((-second, first), dim=-1) * sin
