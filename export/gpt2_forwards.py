"""Export-time forwards for GPT-2's blocks with constant reshape targets (docs/architecture.md, "ONNX graph rules").

transformers' attention, mask and Conv1D code size their reshapes from `x.size()`, which traces to
Shape -> Gather -> Unsqueeze -> Concat chains in every layer. These replacements compute the same values
with constant targets and build the causal + padding mask once per graph; optimum's patcher swaps them in
for the duration of the export only.

Fused (the default, `patching_specs(fused=True)`): each layer's attention core is one onnxruntime contrib node
(`OP`) on q, k and v as they come out of their MatMuls, (batch, seq, hidden), with the cache (batch, heads, past,
head_dim) in and out and the mask as its attention_bias: no head split or merge, no Concat with the cache.
"""

from __future__ import annotations

import torch
from optimum.exporters.onnx.model_patcher import PatchingSpec
from transformers.models.gpt2 import modeling_gpt2
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention
from transformers.pytorch_utils import Conv1D

from kninfer.export.forwards import (
    attend,
    causal_mask,
    fused_attention,
    fused_causal_mask,
    merge_heads,
    split_heads,
)
from kninfer.modeling.gpt2 import SplitQKV


def attention_forward(self: GPT2Attention, hidden_states: torch.Tensor, past_key_values=None, cache_position=None,
                      attention_mask: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """GPT-2 self-attention: heads split by Reshape [0, 0, -1, head_dim], the mask added as given."""
    query, key, value = (split_heads(t, self.head_dim) for t in _qkv(self, hidden_states))
    if past_key_values is not None:
        key, value = past_key_values.update(key, value, self.layer_idx)
    heads = attend(query, key, value, attention_mask, _scale(self))
    return self.resid_dropout(self.c_proj(merge_heads(heads))), None


# GroupQueryAttention (kv_heads = heads) computes the same but measured 3-4% slower on the embedded GPT-2, and
# refuses a step of several tokens after a cache when the batch is above 1; MultiHeadAttention has no such limit.
OP = "MultiHeadAttention"


def fused_attention_forward(self: GPT2Attention, hidden_states: torch.Tensor, past_key_values=None,
                            cache_position=None, attention_mask=None, **kwargs) -> tuple[torch.Tensor, None]:
    """GPT-2 self-attention with its core as one `OP` node on `fused_causal_mask`'s mask; the layer's cache is
    replaced by the op's present key and value."""
    output = fused_attention(*_qkv(self, hidden_states), past_key_values, self.layer_idx, attention_mask,
                             self.num_heads, self.num_heads, _scale(self), op=OP)
    return self.resid_dropout(self.c_proj(output)), None


def conv1d_forward(self: Conv1D, x: torch.Tensor) -> torch.Tensor:
    """x @ W + b as MatMul + Add: no flatten to 2-D and back."""
    return torch.matmul(x, self.weight) + self.bias


def patching_specs(fused: bool = True) -> list[PatchingSpec]:
    """The swaps for optimum's ModelPatcher (a fresh list: the patcher extends it in place); `fused`: the attention
    core as an onnxruntime contrib op."""
    if fused:
        return [PatchingSpec(modeling_gpt2, "create_causal_mask", fused_causal_mask),
                PatchingSpec(GPT2Attention, "forward", fused_attention_forward),
                PatchingSpec(Conv1D, "forward", conv1d_forward)]
    return [PatchingSpec(modeling_gpt2, "create_causal_mask", causal_mask),
            PatchingSpec(GPT2Attention, "forward", attention_forward), PatchingSpec(Conv1D, "forward", conv1d_forward)]


def _qkv(attn: GPT2Attention, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    if isinstance(attn.c_attn, SplitQKV):  # separately factored q/k/v: no Concat then Split
        return attn.c_attn.q(x), attn.c_attn.k(x), attn.c_attn.v(x)
    return attn.c_attn(x).split(attn.split_size, dim=2)


def _scale(attn: GPT2Attention) -> float:
    scale = attn.head_dim**-0.5 if attn.scale_attn_weights else 1.0
    return scale / (attn.layer_idx + 1) if attn.scale_attn_by_inverse_layer_idx else scale
