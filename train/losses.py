"""Distillation losses: the KnGPT2 paper's intermediate-layer KD (ILKD) terms and vanilla soft-target KD.

ILKD = α1·embedding + α2·attention + α3·hidden + α4·ce, each term computed over non-padded positions only:
- embedding: MSE between the embedding outputs (token + position), `hidden_states[0]`;
- attention: Σ over layers of KL(teacher ‖ student) = Σ_k p_T log(p_T / p_S) over the keys of each query's
  attention distribution (softmax of scaled QKᵀ with the causal and padding masks), averaged over heads and
  non-padded queries. The forward direction is the one Hinton-style KD and MiniLM use: the student must put
  mass everywhere the teacher does;
- hidden: Σ over layers of MSE between block outputs, `hidden_states[1:]` (the last one after ln_f, as
  transformers returns it);
- ce: the student's own loss on the labels (next token, or the GLUE label).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from transformers.utils import ModelOutput

from kninfer.errors import KninferError

TERMS = {"ilkd": ("embedding", "attention", "hidden", "ce"), "vanilla": ("kd", "ce"), "none": ("ce",)}
PRETRAIN_ALPHAS = {"embedding": 0.5, "attention": 0.5, "hidden": 0.5, "ce": 0.1}
FINETUNE_ALPHAS = {"embedding": 0.5, "attention": 0.5, "hidden": 0.5, "ce": 0.02}
VANILLA_ALPHAS = {"kd": 0.5, "ce": 0.5}


def default_alphas(kd: str, finetune: bool) -> dict[str, float]:
    """The paper's weights for a KD mode: pre-training or fine-tuning ILKD, 0.5/0.5 for vanilla, CE alone."""
    if kd == "ilkd":
        return dict(FINETUNE_ALPHAS if finetune else PRETRAIN_ALPHAS)
    return dict(VANILLA_ALPHAS) if kd == "vanilla" else {"ce": 1.0}


def kd_terms(kd: str) -> tuple[str, ...]:
    """The loss terms of KD mode `kd`, in --alphas order; an unknown mode is bad input."""
    if kd not in TERMS:
        raise KninferError(f"unknown --kd '{kd}': expected one of {', '.join(TERMS)}")
    return TERMS[kd]


def loss_weights(kd: str, alphas: Mapping[str, float] | Sequence[float] | None, finetune: bool) -> dict[str, float]:
    """Weights by term: `alphas` by name or in `kd_terms` order, checked; None gives the paper's (default_alphas)."""
    terms = kd_terms(kd)
    if alphas is None:
        return default_alphas(kd, finetune)
    if isinstance(alphas, Mapping):
        if set(alphas) != set(terms):
            raise KninferError(f"alphas {dict(alphas)}: --kd {kd} weighs {', '.join(terms)}")
        return {name: float(alphas[name]) for name in terms}
    if len(alphas) != len(terms):
        shown = ",".join(f"{value:g}" for value in alphas)
        raise KninferError(f"--alphas {shown}: --kd {kd} takes {len(terms)} ({','.join(terms)})")
    return {name: float(value) for name, value in zip(terms, alphas, strict=True)}


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` (batch, seq) over the positions where `mask` is 1."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1)


def mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the features and the non-padded positions of (batch, seq, features) tensors."""
    return _masked_mean((student - teacher).pow(2).mean(-1), mask)


def attention_kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) of (batch, heads, query, key) attention maps, over heads and non-padded queries."""
    tiny = torch.finfo(student.dtype).tiny  # masked keys are exact zeros in both maps: they contribute 0
    log_ratio = teacher.clamp_min(tiny).log() - student.clamp_min(tiny).log()
    return _masked_mean((teacher * log_ratio).sum(-1).mean(1), mask)


def embedding_loss(student: ModelOutput, teacher: ModelOutput, mask: torch.Tensor) -> torch.Tensor:
    """MSE between the embedding-layer outputs (token + position)."""
    return mse(student.hidden_states[0], teacher.hidden_states[0], mask)


def attention_loss(student: ModelOutput, teacher: ModelOutput, mask: torch.Tensor) -> torch.Tensor:
    """Σ over layers of the attention KL."""
    return _layer_sum(attention_kl, student.attentions, teacher.attentions, mask)


def hidden_loss(student: ModelOutput, teacher: ModelOutput, mask: torch.Tensor) -> torch.Tensor:
    """Σ over layers of the MSE between block outputs."""
    return _layer_sum(mse, student.hidden_states[1:], teacher.hidden_states[1:], mask)


def _layer_sum(loss, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], mask: torch.Tensor):
    if len(student) != len(teacher):
        raise ValueError(f"ILKD pairs layers one to one: the student has {len(student)}, the teacher {len(teacher)}")
    return sum(loss(s, t, mask) for s, t in zip(student, teacher, strict=True))


def soft_target_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float):
    """Vanilla KD: τ²·KL(teacher ‖ student) of the softened output distributions (MSE for a regression head)."""
    if student.shape[-1] == 1:
        return F.mse_loss(student, teacher)
    log_s = F.log_softmax(student / temperature, -1)
    log_t = F.log_softmax(teacher / temperature, -1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    kl = kl.mean() if kl.dim() == 1 else _masked_mean(kl, mask)  # (batch,) for a classifier, (batch, seq) for an LM
    return temperature**2 * kl


def loss_terms(kd: str, student: ModelOutput, teacher: ModelOutput | None, mask: torch.Tensor,
               temperature: float = 2.0) -> dict[str, torch.Tensor]:
    """Every loss term of a KD mode ("ilkd", "vanilla", "none"), unweighted, by name (see TERMS)."""
    terms = {"ce": student.loss}
    if kd == "ilkd":
        terms |= {"embedding": embedding_loss(student, teacher, mask),
                  "attention": attention_loss(student, teacher, mask),
                  "hidden": hidden_loss(student, teacher, mask)}
    elif kd == "vanilla":
        terms["kd"] = soft_target_loss(student.logits, teacher.logits, mask, temperature)
    return terms
