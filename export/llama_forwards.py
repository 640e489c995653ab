"""Export-time forwards for Llama's blocks (GQA, RoPE) with constant reshape targets (docs/architecture.md,
"ONNX graph rules").

Grouped-query attention without repeating K/V: the query heads that share a KV head are stacked along the sequence
axis, (batch, heads, seq, head_dim) -> (batch, kv_heads, groups·seq, head_dim), so each KV head is read once by one
MatMul; the mask, built once per graph, has its rows repeated to match. cos and sin are computed once per graph
with the head axis already in place. The projections are called as modules, so Kronecker layers trace factored.
"""

from __future__ import annotations

import torch
from optimum.exporters.onnx.model_patcher import PatchingSpec
from transformers import LlamaConfig
from transformers.models.llama import modeling_llama
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

from kninfer.errors import KninferError
from kninfer.export.forwards import attend, causal_mask, merge_heads, split_heads
from kninfer.kron import reshape_tail


def grouped_causal_mask(config: LlamaConfig, input_embeds: torch.Tensor, attention_mask: torch.Tensor,
                        cache_position: torch.Tensor, **kwargs) -> torch.Tensor:
    """`causal_mask` with its rows repeated once per query head of a group: (batch, 1, groups·seq, past+seq)."""
    mask = causal_mask(config, input_embeds, attention_mask, cache_position)
    return torch.cat([mask] * (config.num_attention_heads // config.num_key_value_heads), dim=2)


def rotary_forward(self: LlamaRotaryEmbedding, x: torch.Tensor,
                   position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position_ids · inv_freq as transformers computes them, shaped (batch, 1, seq, head_dim)."""
    if "dynamic" in self.rope_type or self.rope_type == "longrope":  # inv_freq depends on the length: not traceable
        raise KninferError(f"RoPE type '{self.rope_type}' cannot be exported: its frequencies change with length")
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


def patching_specs() -> list[PatchingSpec]:
    """The swaps for optimum's ModelPatcher (a fresh list: the patcher extends it in place)."""
    return [PatchingSpec(modeling_llama, "create_causal_mask", grouped_causal_mask),
            PatchingSpec(LlamaRotaryEmbedding, "forward", rotary_forward),
            PatchingSpec(LlamaAttention, "forward", attention_forward)]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, half: int) -> torch.Tensor:
    """x·cos + rotate_half(x)·sin, the halves cut at a constant index (no Shape chain)."""
    first, second = x[..., :half], x[..., half:]
    return x * cos + torch.cat((-second, first), dim=-1) * sin
