"""compress(teacher, preset): a Kronecker student initialised from a dense teacher of any family, with a per-layer
report."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from kninfer.errors import KninferError
from kninfer.kron import INITS, KroneckerEmbedding, KroneckerLinear, check_positive, relative_error
from kninfer.modeling.budget import auto_spec
from kninfer.modeling.calibrate import block_influence, refit
from kninfer.modeling.configuration_kronecker import KroneckerSpec
from kninfer.modeling.families import dense_weight, dims, family_of, set_dense_weight, weight_shape
from kninfer.modeling.presets import (
    BUDGET_FRACTION,
    PRESETS,
    kngpt2_spec,
    krony_pt_spec,
    load_spec_file,
    odd_mlp_spec,
    svd_spec,
)


@dataclass
class LayerRow:
    """One line of the compression report."""

    path: str
    before: str
    after: str
    params_before: int
    params_after: int
    error: float | None  # relative Frobenius error of the initialisation
    output_error: float | None = None  # relative error of the map's outputs on calibration text (calibrated init)


def compress(
    teacher: PreTrainedModel, preset: str | KroneckerSpec, *, tie_head: bool | None = None, init: str | None = None,
    target_params: int | None = None, ratio: float | None = None, rank: int = 1, odd_base: int = 0, drop: int = 0,
    calibration: torch.Tensor | None = None, progress: Callable[[str], None] | None = None,
) -> tuple[PreTrainedModel, list[LayerRow]]:
    """A student built from `teacher` by `preset` (a name in PRESETS, a JSON spec file or a KroneckerSpec).
    `tie_head` (default: the teacher's tie_word_embeddings) makes a Kronecker embedding's factors the LM head too.
    The student's size is `target_params` or `ratio` of the teacher's for krony-pt, auto, svd, odd-mlp and drop.
    `calibration` (N, T) token ids make `calibrated` the default init: the maps in blocks fitted to the teacher's
    outputs on them (calibrate.py); without them the init is Van Loan's (Krony-PT's rescaled variant for krony-pt).
    auto needs them. `drop` blocks (of least influence on the calibration text) are removed first and the preset
    factors the blocks left, renumbered, for the same budget."""
    family = family_of(teacher.config)
    if type(teacher) is not family.causal_lm:
        raise KninferError(f"the teacher must be a dense {family.name} causal LM ({family.causal_lm.__name__}), "
                           f"got {type(teacher).__name__}")
    check_positive(rank=rank)
    target_params = _target(teacher, target_params, ratio)
    budget = target_params or round(BUDGET_FRACTION * count_parameters(teacher))
    tie_head = bool(teacher.config.tie_word_embeddings) if tie_head is None else tie_head
    if drop:
        teacher, dropped_rows = _drop_first(teacher, preset, drop, calibration)
        student, rows = compress(teacher, preset, tie_head=tie_head, init=init, target_params=budget, rank=rank,
                                 odd_base=odd_base, calibration=calibration, progress=progress)
        return student, dropped_rows + rows
    if isinstance(preset, KroneckerSpec):
        spec = preset
    elif preset in ("distil", "drop"):
        layers = dims(teacher.config).layers
        dropped = (dropped_layers(teacher, _blocks_for(teacher, budget), calibration) if preset == "drop"
                   else range(1, layers, 2))
        return drop_layers(teacher, [i for i in range(layers) if i not in dropped])
    elif preset == "kngpt2":
        spec = kngpt2_spec(teacher, odd_base=odd_base, tie_head=tie_head)
    elif preset == "krony-pt":
        spec = krony_pt_spec(teacher, target_params, rank)
    elif preset == "svd":
        spec = svd_spec(teacher, budget)
    elif preset == "odd-mlp":
        spec = odd_mlp_spec(teacher, budget, odd_base)
    elif preset == "auto":
        if calibration is None:
            raise KninferError("preset auto chooses shapes by output error on calibration text: give --calib")
        spec = auto_spec(teacher, calibration, budget)
    elif Path(preset).suffix == ".json":
        spec = load_spec_file(preset, teacher)
        spec = KroneckerSpec(spec.modules, spec.tie_head or tie_head)
    else:
        raise KninferError(f"unknown preset '{preset}': expected one of {', '.join(PRESETS)} or a .json spec file")
    init = init or ("calibrated" if calibration is not None else
                    "van-loan-rescaled" if preset == "krony-pt" else "van-loan")
    if init not in (*INITS, "calibrated"):
        raise KninferError(f"unknown init '{init}': expected one of {', '.join(INITS)} or calibrated")
    if init != "calibrated":
        return factor(teacher, spec, init)
    if calibration is None:
        raise KninferError("the calibrated init needs calibration text (--calib)")
    student, rows = factor(teacher, spec, "van-loan")
    errors = refit(student, teacher, calibration, progress=progress)
    for row in rows:
        if row.path in errors:
            module = student.get_submodule(row.path)
            row.error = relative_error(dense_weight(teacher, row.path)[0], module.A, module.B)
            row.output_error = errors[row.path]
    return student, rows


@torch.no_grad()
def factor(teacher: PreTrainedModel, spec: KroneckerSpec, init: str) -> tuple[PreTrainedModel, list[LayerRow]]:
    """A Kronecker student with `spec`'s modules set to the nearest Kronecker factors of the teacher's, every other
    weight copied."""
    family = family_of(teacher.config)
    fields = {k: v for k, v in teacher.config.to_dict().items() if k not in ("model_type", "architectures")}
    student = AutoModelForCausalLM.from_config(AutoConfig.for_model(family.student_type, kronecker=spec, **fields))
    student.config.architectures = [type(student).__name__]
    own = student.state_dict()
    shared = {k: v for k, v in teacher.state_dict().items() if k in own and own[k].shape == v.shape}
    student.load_state_dict(shared, strict=False)
    rows = []
    for path, module in student.named_modules():
        if isinstance(module, (KroneckerEmbedding, KroneckerLinear)):
            W, b = dense_weight(teacher, path)
            error = module.load_dense(W, b, init)
            before = W.numel() + (0 if b is None else b.numel())
            rows.append(LayerRow(path, _shape(W), _factors(module), before, _count(module), error))
        elif isinstance(module, nn.Linear) and f"{path}.weight" not in shared and f"{path}.weight" in own:
            set_dense_weight(module, *dense_weight(teacher, path))  # one of GPT-2's split q/k/v left dense
    return student, rows


def dropped_layers(teacher: PreTrainedModel, count: int, calibration: torch.Tensor | None) -> list[int]:
    """The `count` blocks to drop: those of least block influence on the calibration text (ShortGPT), or without it
    spread evenly between the first and last block (both always kept)."""
    layers = dims(teacher.config).layers
    if calibration is not None:
        influence = block_influence(teacher, calibration)
        return sorted(sorted(range(layers), key=influence.__getitem__)[:count])
    inner = torch.linspace(1, layers - 2, count).round().int().tolist() if layers > 2 else [layers - 1]
    return sorted(set(inner))


def _blocks_for(teacher: PreTrainedModel, target_params: int) -> int:
    """How many whole blocks to drop for a student of about `target_params` (at least one, never every block)."""
    block = _count(teacher.get_submodule(family_of(teacher.config).block(0)))
    return min(max(round((count_parameters(teacher) - target_params) / block), 1), dims(teacher.config).layers - 1)


def _drop_first(teacher: PreTrainedModel, preset: str | KroneckerSpec, count: int,
                calibration: torch.Tensor | None) -> tuple[PreTrainedModel, list[LayerRow]]:
    """The teacher without its `count` blocks of least influence, and the report rows of those dropped."""
    layers = dims(teacher.config).layers
    if preset in ("drop", "distil"):
        raise KninferError(f"--drop removes blocks before a factoring preset; preset {preset} only drops blocks")
    if not 0 < count < layers:
        raise KninferError(f"--drop must be between 1 and {layers - 1} (the teacher has {layers} blocks), got {count}")
    dropped = dropped_layers(teacher, count, calibration)
    smaller, rows = drop_layers(teacher, [i for i in range(layers) if i not in dropped])
    return smaller, [row for row in rows if row.params_after == 0]


def drop_layers(teacher: PreTrainedModel, keep: list[int]) -> tuple[PreTrainedModel, list[LayerRow]]:
    """DistilGPT2-style student: the same architecture keeping the teacher's blocks `keep` (in order)."""
    family = family_of(teacher.config)
    layers = dims(teacher.config).layers
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(keep)
    student = family.causal_lm(config)
    prefix = f"{family.layers}."
    state = {}
    for key, value in teacher.state_dict().items():
        if key.startswith(prefix):
            layer, rest = key.removeprefix(prefix).split(".", 1)
            if int(layer) in keep:
                state[f"{family.block(keep.index(int(layer)))}.{rest}"] = value
        else:
            state[key] = value
    student.load_state_dict(state)
    rows = []
    for i in range(layers):
        params = _count(teacher.get_submodule(family.block(i)))
        rows.append(LayerRow(family.block(i), "block", "kept" if i in keep else "dropped", params,
                             params if i in keep else 0, None))
    return student, rows


def _target(teacher: PreTrainedModel, target_params: int | None, ratio: float | None) -> int | None:
    """The student's size from --target-params or --ratio (a fraction of the teacher's parameters)."""
    if target_params is not None and ratio is not None:
        raise KninferError("give --target-params or --ratio, not both")
    if ratio is not None:
        if not 0 < ratio < 1:
            raise KninferError(f"--ratio must be between 0 and 1 (a fraction of the teacher's parameters), got {ratio}")
        return round(ratio * count_parameters(teacher))
    if target_params is not None:
        check_positive(target_params=target_params)
    return target_params


def report_rows(model: nn.Module) -> list[LayerRow]:
    """The per-layer table for a saved model: every Kronecker module with its dense shape."""
    rows = []
    for path, module in model.named_modules():
        if isinstance(module, (KroneckerLinear, KroneckerEmbedding)):
            out_features, in_features = weight_shape(model, path)
            rows.append(LayerRow(path, f"({out_features}, {in_features})", _factors(module),
                                 out_features * in_features, _count(module), None))
    return rows


def count_parameters(model: nn.Module, include_head: bool = True) -> int:
    """Distinct parameters; without an untied dense LM head when `include_head` is False (the paper's count)."""
    total = _count(model)
    head = getattr(model, "lm_head", None)
    if not include_head and isinstance(head, nn.Linear) and head.weight is not _input_weight(model):
        total -= head.weight.numel()
    return total


def _input_weight(model: nn.Module) -> torch.Tensor | None:
    return getattr(model.get_input_embeddings(), "weight", None)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _shape(W: torch.Tensor) -> str:
    return f"({W.shape[0]}, {W.shape[1]})"


def _factors(module: KroneckerLinear | KroneckerEmbedding) -> str:
    A, B = module.A, module.B if isinstance(module, KroneckerLinear) else module.B.unsqueeze(1)
    rank = f" ×{A.shape[0]}" if A.shape[0] > 1 else ""
    return f"({A.shape[1]}, {A.shape[2]}) ⊗ ({B.shape[1]}, {B.shape[2]}){rank}"
