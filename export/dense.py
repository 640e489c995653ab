"""`--dense`: the same model as a plain GPT-2 with every Kronecker weight materialised, for benchmarks."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, PreTrainedModel

from kninfer.kron import KroneckerEmbedding
from kninfer.modeling.gpt2 import EMBEDDING, dense_weight, weight_shapes
from kninfer.modeling.io import is_classifier


@torch.no_grad()
def densify(model: PreTrainedModel) -> PreTrainedModel:
    """A plain GPT2LMHeadModel / GPT2ForSequenceClassification computing what `model` computes."""
    if model.config.model_type == "gpt2":
        return model
    fields = {k: v for k, v in model.config.to_dict().items() if k not in ("model_type", "kronecker")}
    tied = isinstance(model.transformer.wte, KroneckerEmbedding) and model.config.kronecker.get("tie_head")
    config = GPT2Config(**{**fields, "tie_word_embeddings": bool(tied or not isinstance(model.transformer.wte,
                                                                                          KroneckerEmbedding))})
    dense = (GPT2ForSequenceClassification if is_classifier(model) else GPT2LMHeadModel)(config).eval()
    state = dense.state_dict()
    own = model.state_dict()
    state.update({k: v for k, v in own.items() if k in state and state[k].shape == v.shape})
    for path in weight_shapes(model.config):
        if not path.endswith((".q", ".k", ".v")):
            W, b = dense_weight(model, path)
            _store(state, path, W, b)
    for block in (f"transformer.h.{i}.attn.c_attn" for i in range(config.n_layer)):
        parts = [dense_weight(model, f"{block}.{name}") for name in "qkv"]
        _store(state, block, torch.cat([W for W, _ in parts]), torch.cat([b for _, b in parts]))
    if tied and "lm_head.weight" in state:
        state["lm_head.weight"] = state[f"{EMBEDDING}.weight"]
    dense.load_state_dict(state)
    return dense


def _store(state: dict[str, torch.Tensor], path: str, W: torch.Tensor, b: torch.Tensor | None) -> None:
    if path == EMBEDDING:
        state[f"{path}.weight"] = W.detach().clone()
        return
    state[f"{path}.weight"] = W.detach().T.contiguous()  # Conv1D stores (in, out)
    if b is not None:
        state[f"{path}.bias"] = b.detach().clone()
