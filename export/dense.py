"""`--dense`: the same model as its family's plain transformers model, every Kronecker weight materialised, for
benchmarks."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from kninfer.kron import KroneckerEmbedding
from kninfer.modeling.families import dense_weight, family_of, set_dense_weight
from kninfer.modeling.io import is_classifier


@torch.no_grad()
def densify(model: PreTrainedModel) -> PreTrainedModel:
    """A dense model of `model`'s family (causal LM or classifier) computing what `model` computes."""
    family = family_of(model.config)
    if model.config.model_type == family.name:
        return model
    fields = {k: v for k, v in model.config.to_dict().items() if k not in ("model_type", "kronecker")}
    embedding = model.get_input_embeddings()
    factored = isinstance(embedding, KroneckerEmbedding)
    fields["tie_word_embeddings"] = model.config.kronecker.tie_head if factored else model.config.tie_word_embeddings
    config = family.config_class(**fields)
    dense = (family.classifier if is_classifier(model) else family.causal_lm)(config).eval()
    dense.load_state_dict({k: v for k, v in model.state_dict().items()
                           if k in dense.state_dict() and dense.state_dict()[k].shape == v.shape}, strict=False)
    for path, module in dense.named_modules():
        tied_head = path == "lm_head" and config.tie_word_embeddings
        if isinstance(module, (nn.Linear, Conv1D, nn.Embedding)) and not tied_head:
            set_dense_weight(module, *dense_weight(model, path))
    return dense
