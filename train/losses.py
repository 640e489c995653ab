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

The paper's recipe (`paper`: those weights, hidden as MSE) starves a short run: the residual stream's scale grows
with depth and a few positions carry huge states, so the raw MSE of the last layers outweighs everything, CE
included. kninfer's pre-training recipe (the default) measures hidden states by their relative error instead,
mean over layers of ‖s − t‖² / ‖t‖² at each position, and weighs CE as much (bench/results/trained-miniature.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers.utils import ModelOutput

from kninfer.errors import KninferError

TERMS = {"ilkd": ("embedding", "attention", "hidden", "ce"), "vanilla": ("kd", "ce"), "none": ("ce",)}
HIDDEN_FORMS = ("mse", "relative")


@dataclass(frozen=True)
class Recipe:
    """The weight of each loss term of a KD mode, and how ILKD's hidden term is measured (HIDDEN_FORMS)."""

    weights: dict[str, float] = field(default_factory=lambda: {"ce": 1.0})
    hidden: str = "relative"


PAPER = {  # (kd, fine-tuning) -> the paper's recipe
    ("ilkd", False): Recipe({"embedding": 0.5, "attention": 0.5, "hidden": 0.5, "ce": 0.1}, "mse"),
    ("ilkd", True): Recipe({"embedding": 0.5, "attention": 0.5, "hidden": 0.5, "ce": 0.02}, "mse"),
    ("vanilla", False): Recipe({"kd": 0.5, "ce": 0.5}),
    ("vanilla", True): Recipe({"kd": 0.5, "ce": 0.5}),
}
KNINFER_PRETRAIN = Recipe({"embedding": 0.0, "attention": 0.0, "hidden": 1.0, "ce": 1.0}, "relative")


def default_recipe(kd: str, finetune: bool) -> Recipe:
    """The default recipe of a KD mode: kninfer's for ILKD pre-training, else the paper's (CE alone for none)."""
    if kd == "ilkd" and not finetune:
        return KNINFER_PRETRAIN
    return PAPER.get((kd, finetune), Recipe())


def kd_terms(kd: str) -> tuple[str, ...]:
    """The loss terms of KD mode `kd`, in --alphas order; an unknown mode is bad input."""
    if kd not in TERMS:
        raise KninferError(f"unknown --kd '{kd}': expected one of {', '.join(TERMS)}")
    return TERMS[kd]


def loss_recipe(kd: str, alphas: Recipe | Mapping[str, float] | Sequence[float] | str | None,
                finetune: bool) -> Recipe:
    """The recipe for `alphas`: None the default (default_recipe), "paper" the paper's, a Recipe itself (checked),
    else weights by term name or in `kd_terms` order (checked), with the default's hidden form."""
    terms = kd_terms(kd)
    default = default_recipe(kd, finetune)
    if alphas is None:
        return default
    if isinstance(alphas, Recipe):
        if alphas.hidden not in HIDDEN_FORMS:
            raise KninferError(f"hidden form '{alphas.hidden}': expected one of {', '.join(HIDDEN_FORMS)}")
        return Recipe(loss_recipe(kd, alphas.weights, finetune).weights, alphas.hidden)
    if isinstance(alphas, str):
        if alphas != "paper":
            raise KninferError(f"--alphas '{alphas}': expected 'paper' or comma-separated numbers")
        return PAPER.get((kd, finetune), Recipe())
    if isinstance(alphas, Mapping):
        if set(alphas) != set(terms):
            raise KninferError(f"alphas {dict(alphas)}: --kd {kd} weighs {', '.join(terms)}")
        return Recipe({name: float(alphas[name]) for name in terms}, default.hidden)
    if len(alphas) != len(terms):
        shown = ",".join(f"{value:g}" for value in alphas)
        raise KninferError(f"--alphas {shown}: --kd {kd} takes {len(terms)} ({','.join(terms)})")
    return Recipe({name: float(value) for name, value in zip(terms, alphas, strict=True)}, default.hidden)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` (batch, seq) over the positions where `mask` is 1."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1)


def mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the features and the non-padded positions of (batch, seq, features) tensors."""
    return _masked_mean((student - teacher).pow(2).mean(-1), mask)


def relative_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """‖student − teacher‖² / ‖teacher‖² at each position of (batch, seq, features) tensors, over non-padded ones."""
    tiny = torch.finfo(teacher.dtype).tiny
    return _masked_mean((student - teacher).pow(2).sum(-1) / teacher.pow(2).sum(-1).clamp_min(tiny), mask)


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
    """Σ over layers of the MSE between block outputs (the paper's)."""
    return _layer_sum(mse, student.hidden_states[1:], teacher.hidden_states[1:], mask)


def relative_hidden_loss(student: ModelOutput, teacher: ModelOutput, mask: torch.Tensor) -> torch.Tensor:
    """Mean over layers of the relative error of block outputs (`relative_mse`): each layer and position counts
    alike, whatever its scale."""
    layers = student.hidden_states[1:]
    return _layer_sum(relative_mse, layers, teacher.hidden_states[1:], mask) / len(layers)


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
               temperature: float = 2.0, hidden: str = "mse") -> dict[str, torch.Tensor]:
    """Every loss term of a KD mode ("ilkd", "vanilla", "none"), unweighted, by name (see TERMS); `hidden` is the
    form of ILKD's hidden term (HIDDEN_FORMS). Outputs without attention maps have no attention term."""
    terms = {"ce": student.loss}
    if kd == "ilkd":
        hidden_term = relative_hidden_loss if hidden == "relative" else hidden_loss
        terms |= {"embedding": embedding_loss(student, teacher, mask), "hidden": hidden_term(student, teacher, mask)}
        if student.attentions is not None:
            terms["attention"] = attention_loss(student, teacher, mask)
    elif kd == "vanilla":
        terms["kd"] = soft_target_loss(student.logits, teacher.logits, mask, temperature)
    return terms
