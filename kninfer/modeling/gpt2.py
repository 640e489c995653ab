"""GPT-2's one quirk: q, k and v live in one fused Conv1D, c_attn, which kninfer splits so each can be factored.
Conv1D's (in, out) layout is handled in families.py; export has its own GPT-2 edge (export/gpt2_forwards.py).
See docs/architecture.md, "The Kronecker convention"."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

QKV = ("q", "k", "v")


class SplitQKV(nn.Module):
    """GPT-2's fused c_attn as three maps q, k, v whose outputs are concatenated, so each can be factored."""

    def __init__(self, q: nn.Module, k: nn.Module, v: nn.Module) -> None:
        super().__init__()
        self.q, self.k, self.v = q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


def split_qkv(model: nn.Module, path: str) -> None:
    """Before `path` (…attn.c_attn.q/k/v) becomes a Kronecker layer: make c_attn a SplitQKV of nn.Linear (once)."""
    parent, _, name = path.rpartition(".")
    if name not in QKV or not parent.endswith("attn.c_attn"):
        return
    attn = model.get_submodule(parent.removesuffix(".c_attn"))
    if not isinstance(attn.c_attn, SplitQKV):
        d = attn.embed_dim
        attn.c_attn = SplitQKV(*(nn.Linear(d, d) for _ in QKV))


def fused_part(model: nn.Module, path: str) -> tuple[int, int] | None:
    """The (out, in) shape of q, k or v inside a fused c_attn; None for any other path."""
    fused = fused_module(model, path)
    return None if fused is None else (fused.weight.shape[0], fused.weight.shape[0])


Reader = Callable[[nn.Module, str], tuple[torch.Tensor, torch.Tensor | None]]


def fused_weight(model: nn.Module, path: str, read: Reader) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """q, k or v sliced out of a fused c_attn, or a split c_attn's three maps concatenated (each read by `read`);
    None for any other path."""
    fused = fused_module(model, path)
    if fused is not None:
        W, b = read(model, path.rpartition(".")[0])
        part = slice(QKV.index(path[-1]) * W.shape[1], (QKV.index(path[-1]) + 1) * W.shape[1])
        return W[part], None if b is None else b[part]
    if path.endswith("attn.c_attn") and isinstance(model.get_submodule(path), SplitQKV):
        parts = [read(model, f"{path}.{name}") for name in QKV]
        biases = [b for _, b in parts]
        return torch.cat([W for W, _ in parts]), None if None in biases else torch.cat(biases)
    return None


def fused_module(model: nn.Module, path: str) -> nn.Module | None:
    """The fused c_attn that holds `path` (…attn.c_attn.q/k/v), or None for any other path."""
    parent, _, name = path.rpartition(".")
    if name not in QKV or not parent.endswith("attn.c_attn"):
        return None
    module = model.get_submodule(parent)
    return None if isinstance(module, SplitQKV) else module
