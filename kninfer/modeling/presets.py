"""Compression presets as data: each turns a dense teacher into a Kronecker spec, for any family."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Any

from torch import nn

from kninfer.errors import KninferError
from kninfer.kron import FactorShape, check_divides, check_positive, check_rank, factor_shapes
from kninfer.modeling.configuration_kronecker import FACTORS, KroneckerSpec
from kninfer.modeling.families import dims, family_of, weight_shapes

PRESETS = ("kngpt2", "krony-pt", "auto", "svd", "odd-mlp", "drop", "distil")
KRONY_PT_FRACTION = 0.655  # Krony-PT's 81M model is 65.5% of GPT-2 small's 124M
BUDGET_FRACTION = 0.8  # auto, svd, odd-mlp and drop without a target: 80% of the teacher's parameters


def kngpt2_spec(teacher: nn.Module, odd_base: int = 0, f: int = 2, tie_head: bool = False) -> KroneckerSpec:
    """The KnGPT2 paper: the embedding with B (1, f); every linear map of the odd layers with B (2, 1)."""
    family = family_of(teacher.config)
    patterns: dict[str, dict[str, int]] = {family.embedding: {"m2": 1, "n2": f}}
    for i in range(1 - odd_base % 2, dims(teacher.config).layers, 2):
        patterns[f"{family.block(i)}.*"] = {"m2": 2, "n2": 1}
    return resolve_spec({"modules": patterns, "tie_head": tie_head}, teacher)


def krony_pt_spec(teacher: nn.Module, target_params: int | None = None, rank: int = 1) -> KroneckerSpec:
    """Krony-PT: every MLP map of every layer, one factor shape (transposed for the down map) chosen to land nearest
    `target_params`, by default KRONY_PT_FRACTION of the teacher's parameters."""
    family = family_of(teacher.config)
    shapes = weight_shapes(teacher)
    paths = [f"{family.block(i)}.{name}" for i in range(dims(teacher.config).layers) for name in family.mlp]
    up = shapes[paths[0]]
    dense_total = sum(p.numel() for p in teacher.parameters())
    kept = dense_total - sum(shapes[path][0] * shapes[path][1] for path in paths)
    target = target_params or round(KRONY_PT_FRACTION * dense_total)
    best = min(factor_shapes(*up, rank), key=lambda s: abs(kept + len(paths) * s.params - target))
    check_rank(rank, best.m1, best.n1, best.m2, best.n2)
    return KroneckerSpec({path: best if shapes[path] == up else best.transposed() for path in paths})


def block_maps(teacher: nn.Module) -> list[str]:
    """Every attention and MLP map of every block: what auto and svd may factor."""
    family = family_of(teacher.config)
    return [f"{family.block(i)}.{name}" for i in range(dims(teacher.config).layers)
            for name in (*family.attention, *family.mlp)]


def map_budget(teacher: nn.Module, paths: list[str], target_params: int) -> int:
    """Parameters left for the maps in `paths` when the whole student has `target_params`."""
    shapes = weight_shapes(teacher)
    fixed = sum(p.numel() for p in teacher.parameters()) - sum(shapes[p][0] * shapes[p][1] for p in paths)
    if target_params <= fixed:
        raise KninferError(f"a student of {target_params:,} parameters is below the {fixed:,} parameters outside "
                           "the maps that can be factored: ask for more (--ratio, --target-params)")
    return target_params - fixed


def svd_spec(teacher: nn.Module, target_params: int, paths: list[str] | None = None) -> KroneckerSpec:
    """Every block map (or those in `paths`) at low rank, A (out, 1) ⊗ B (1, in) × r, one fraction of each map's size
    for all, so that the student lands near `target_params` (with calibration, activation-aware SVD)."""
    shapes, paths = weight_shapes(teacher), paths or block_maps(teacher)
    fraction = map_budget(teacher, paths, target_params) / sum(shapes[p][0] * shapes[p][1] for p in paths)
    modules = {}
    for path in paths:
        out_features, in_features = shapes[path]
        rank = max(1, round(fraction * out_features * in_features / (out_features + in_features)))
        modules[path] = FactorShape(out_features, 1, 1, in_features, min(rank, out_features, in_features))
    return KroneckerSpec(modules)


def odd_mlp_spec(teacher: nn.Module, target_params: int, odd_base: int = 0) -> KroneckerSpec:
    """The MLP maps of the odd blocks (the paper's layers) at one relative low rank, landing near `target_params`:
    before training, the best student at 85% of SmolLM2-135M (bench/results/quality-smollm2.md)."""
    family = family_of(teacher.config)
    paths = [f"{family.block(i)}.{name}" for i in range(1 - odd_base % 2, dims(teacher.config).layers, 2)
             for name in family.mlp]
    spec = svd_spec(teacher, target_params, paths)
    if any(shape.rank * (shape.m1 + shape.n2) >= shape.m1 * shape.n2 for shape in spec.modules.values()):
        raise KninferError(f"a student of {target_params:,} parameters leaves the odd blocks' MLP maps at a rank "
                           "that saves nothing: ask for fewer parameters (--ratio, --target-params)")
    return spec


def resolve_spec(spec: dict[str, Any], teacher: nn.Module) -> KroneckerSpec:
    """Expand glob patterns and partial shapes ({m2, n2} or {m1, n1}) into explicit per-module factors."""
    shapes = weight_shapes(teacher)
    modules: dict[str, FactorShape] = {}
    for pattern, entry in spec.get("modules", {}).items():
        matched = [path for path in shapes if fnmatch.fnmatchcase(path, pattern)]
        if not matched:
            raise KninferError(f"spec pattern '{pattern}' matches no factorable module (see `kninfer info`)")
        for path in matched:
            modules[path] = _full_factors(path, shapes[path], entry)
    tie_head = spec.get("tie_head", False)
    if not isinstance(tie_head, bool):
        raise KninferError(f'the spec\'s "tie_head" must be true or false, got {tie_head!r}')
    return KroneckerSpec(modules, tie_head)


def load_spec_file(path: str | Path, teacher: nn.Module) -> KroneckerSpec:
    """A custom spec from JSON: {"modules": {pattern: {"m2": .., "n2": .., "rank": ..}}, "tie_head": ..}."""
    try:
        spec = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError) as error:  # ValueError: bad UTF-8 or JSON
        raise KninferError(f"cannot read spec file '{path}': {error}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("modules"), dict):
        raise KninferError(f"spec file '{path}' must hold an object with a \"modules\" object")
    return resolve_spec(spec, teacher)


def _full_factors(path: str, shape: tuple[int, int], entry: Any) -> FactorShape:
    """One module's factor shapes from a spec entry with {m2, n2} or {m1, n1} (rank 1 unless set)."""
    out_features, in_features = shape
    if not isinstance(entry, dict) or not ({"m2", "n2"} <= entry.keys() or {"m1", "n1"} <= entry.keys()):
        raise KninferError(f"'{path}': a spec entry needs m2 and n2 (or m1 and n1), got {entry!r}")
    factors = {"rank": 1} | {key: entry[key] for key in FACTORS if key in entry}
    try:
        check_positive(**factors)
        if {"m2", "n2"} <= factors.keys():
            factors.setdefault("m1", out_features // factors["m2"])
            factors.setdefault("n1", in_features // factors["n2"])
        else:
            factors.setdefault("m2", out_features // factors["m1"])
            factors.setdefault("n2", in_features // factors["n1"])
        shape_ = FactorShape(**factors)
        check_divides(out_features, in_features, shape_.m1, shape_.n1, shape_.m2, shape_.n2)
        check_rank(shape_.rank, shape_.m1, shape_.n1, shape_.m2, shape_.n2)
    except KninferError as error:
        raise KninferError(f"'{path}': {error}") from None
    return shape_
