"""compress(teacher, preset): a KnGPT2 student initialised from a dense GPT-2 teacher, with a per-layer report."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from kninfer.errors import KninferError
from kninfer.kron import INITS, KroneckerEmbedding, KroneckerLinear, check_positive
from kninfer.modeling.configuration_kngpt2 import KnGPT2Config
from kninfer.modeling.gpt2 import SplitQKV, dense_weight, weight_shapes
from kninfer.modeling.modeling_kngpt2 import KnGPT2LMHeadModel
from kninfer.modeling.presets import PRESETS, kngpt2_spec, krony_pt_spec, load_spec_file


@dataclass
class LayerRow:
    """One line of the compression report."""

    path: str
    before: str
    after: str
    params_before: int
    params_after: int
    error: float | None  # relative Frobenius error of the initialisation


def compress(
    teacher: GPT2LMHeadModel, preset: str, *, tie_head: bool = False, init: str | None = None,
    target_params: int | None = None, rank: int = 1, odd_base: int = 0,
) -> tuple[GPT2LMHeadModel, list[LayerRow]]:
    """A student built from `teacher` by `preset` (a name in PRESETS or a JSON spec file)."""
    if type(teacher).__name__ != "GPT2LMHeadModel":
        raise KninferError(f"the teacher must be a dense GPT-2 causal LM, got {type(teacher).__name__}")
    check_positive(rank=rank)
    if target_params is not None:
        check_positive(target_params=target_params)
    config: GPT2Config = teacher.config
    if preset == "distil":
        return drop_layers(teacher)
    if preset == "kngpt2":
        spec = kngpt2_spec(config, odd_base=odd_base, tie_head=tie_head)
    elif preset == "krony-pt":
        spec = krony_pt_spec(config, target_params, rank)
    elif Path(preset).suffix == ".json":
        spec = load_spec_file(preset, config)
        spec["tie_head"] = spec["tie_head"] or tie_head
    else:
        raise KninferError(f"unknown preset '{preset}': expected one of {', '.join(PRESETS)} or a .json spec file")
    init = init or ("van-loan-rescaled" if preset == "krony-pt" else "van-loan")
    if init not in INITS:
        raise KninferError(f"unknown init '{init}': expected one of {', '.join(INITS)}")
    return factor(teacher, spec, init)


def factor(teacher: GPT2LMHeadModel, spec: dict[str, Any], init: str) -> tuple[KnGPT2LMHeadModel, list[LayerRow]]:
    """A KnGPT2 student with `spec`'s modules set to the nearest Kronecker factors of the teacher's."""
    fields = {k: v for k, v in teacher.config.to_dict().items() if k not in ("model_type", "architectures")}
    student = KnGPT2LMHeadModel(KnGPT2Config(kronecker=spec, **fields))
    student.config.architectures = ["KnGPT2LMHeadModel"]
    own = student.state_dict()
    shared = {k: v for k, v in teacher.state_dict().items() if k in own and own[k].shape == v.shape}
    student.load_state_dict(shared, strict=False)
    rows = []
    for path, module in student.named_modules():
        if isinstance(module, KroneckerEmbedding):
            W, _ = dense_weight(teacher, path)
            error = module.load_dense(W, init)
            after = _factors(module.A, module.B.unsqueeze(1))
            rows.append(LayerRow(path, _shape(W), after, W.numel(), _count(module), error))
        elif isinstance(module, KroneckerLinear):
            W, b = dense_weight(teacher, path)
            error = module.load_dense(W, b, init)
            before = W.numel() + (0 if b is None else b.numel())
            rows.append(LayerRow(path, _shape(W), _factors(module.A, module.B), before, _count(module), error))
        elif isinstance(module, nn.Linear) and isinstance(student.get_submodule(path.rpartition(".")[0]), SplitQKV):
            W, b = dense_weight(teacher, path)
            module.weight.data.copy_(W)
            module.bias.data.copy_(b)
    return student, rows


def drop_layers(teacher: GPT2LMHeadModel) -> tuple[GPT2LMHeadModel, list[LayerRow]]:
    """DistilGPT2-style student: a plain GPT-2 keeping the teacher's layers 0, 2, 4, ..."""
    keep = list(range(0, teacher.config.n_layer, 2))
    config = copy.deepcopy(teacher.config)
    config.n_layer = len(keep)
    student = GPT2LMHeadModel(config)
    state = {}
    for key, value in teacher.state_dict().items():
        if key.startswith("transformer.h."):
            layer, rest = key.removeprefix("transformer.h.").split(".", 1)
            if int(layer) in keep:
                state[f"transformer.h.{keep.index(int(layer))}.{rest}"] = value
        else:
            state[key] = value
    student.load_state_dict(state)
    rows = [
        LayerRow(f"transformer.h.{i}", "block", "kept" if i in keep else "dropped",
                 _count(teacher.transformer.h[i]), _count(teacher.transformer.h[i]) if i in keep else 0, None)
        for i in range(teacher.config.n_layer)
    ]
    return student, rows


def report_rows(model: nn.Module) -> list[LayerRow]:
    """The per-layer table for a saved model: every factorable module, Kronecker or dense."""
    rows = []
    for path, (out_features, in_features) in weight_shapes(model.config).items():
        try:
            module = model.get_submodule(path)
        except AttributeError:
            module = None
        if isinstance(module, (KroneckerLinear, KroneckerEmbedding)):
            B = module.B if isinstance(module, KroneckerLinear) else module.B.unsqueeze(1)
            rows.append(LayerRow(path, f"({out_features}, {in_features})", _factors(module.A, B),
                                 out_features * in_features, _count(module), None))
    return rows


def count_parameters(model: nn.Module, include_head: bool = True) -> int:
    """Distinct parameters; without an untied dense LM head when `include_head` is False (the paper's count)."""
    total = _count(model)
    head = getattr(model, "lm_head", None)
    if not include_head and isinstance(head, nn.Linear) and head.weight is not _input_weight(model):
        total -= head.weight.numel()
    return total


def _input_weight(model: nn.Module):
    return getattr(model.transformer.wte, "weight", None)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _shape(W) -> str:
    return f"({W.shape[0]}, {W.shape[1]})"


def _factors(A, B) -> str:
    rank = f" ×{A.shape[0]}" if A.shape[0] > 1 else ""
    return f"({A.shape[1]}, {A.shape[2]}) ⊗ ({B.shape[1]}, {B.shape[2]}){rank}"


