"""The GPT-2 adapter of the torch side: factorable paths, dense weights read from Conv1D's (in, out) layout, and
GPT-2's fused c_attn split into q, k, v. Export has its own GPT-2 edge (export/lean.py, export/dense.py); see
docs/architecture.md, "The Kronecker convention"."""

from __future__ import annotations

import torch
from torch import nn
from transformers import GPT2Config
from transformers.pytorch_utils import Conv1D

from kninfer.errors import KninferError

EMBEDDING = "transformer.wte"


class SplitQKV(nn.Module):
    """GPT-2's fused c_attn as three maps q, k, v whose outputs are concatenated, so each can be factored."""

    def __init__(self, q: nn.Module, k: nn.Module, v: nn.Module) -> None:
        super().__init__()
        self.q, self.k, self.v = q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


def weight_shapes(config: GPT2Config) -> dict[str, tuple[int, int]]:
    """Every module path that may be factored, with its (out, in) shape."""
    d = config.n_embd
    inner = config.n_inner or 4 * d
    shapes = {EMBEDDING: (config.vocab_size, d)}
    for i in range(config.n_layer):
        block = f"transformer.h.{i}"
        shapes.update({f"{block}.attn.c_attn.{name}": (d, d) for name in "qkv"})
        shapes[f"{block}.attn.c_proj"] = (d, d)
        shapes[f"{block}.mlp.c_fc"] = (inner, d)
        shapes[f"{block}.mlp.c_proj"] = (d, inner)
    return shapes


def dense_weight(model: nn.Module, path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (out, in) weight and bias at `path` of a GPT-2 (or KnGPT2) model, q/k/v sliced out of c_attn."""
    parent, _, name = path.rpartition(".")
    if name in ("q", "k", "v") and parent.endswith("c_attn"):
        fused = model.get_submodule(parent)
        if not isinstance(fused, SplitQKV):
            W, b = dense_weight(model, parent)
            part = slice("qkv".index(name) * W.shape[1], ("qkv".index(name) + 1) * W.shape[1])
            return W[part], None if b is None else b[part]
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


def split_qkv(model: nn.Module, block: str) -> SplitQKV:
    """Replace `block.attn.c_attn` by a SplitQKV of three nn.Linear (once) and return it."""
    attn = model.get_submodule(f"{block}.attn")
    if not isinstance(attn.c_attn, SplitQKV):
        d = attn.embed_dim
        attn.c_attn = SplitQKV(*(nn.Linear(d, d) for _ in range(3)))
    return attn.c_attn
