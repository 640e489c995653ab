"""Compression presets as data: each turns a teacher's GPT-2 config into a Kronecker spec."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Any

from transformers import GPT2Config

from kninfer.errors import KninferError
from kninfer.kron import check_divides, check_positive, check_rank, factor_shapes
from kninfer.modeling.configuration_kngpt2 import FACTORS
from kninfer.modeling.gpt2 import EMBEDDING, weight_shapes

PRESETS = ("kngpt2", "krony-pt", "distil")


def kngpt2_spec(config: GPT2Config, odd_base: int = 0, f: int = 2, tie_head: bool = False) -> dict[str, Any]:
    """The KnGPT2 paper: embedding with B (1, f); every linear map of the odd layers with B (2, 1)."""
    layers = range(1 - odd_base % 2, config.n_layer, 2)
    patterns: dict[str, dict[str, int]] = {EMBEDDING: {"m2": 1, "n2": f}}
    for i in layers:
        patterns[f"transformer.h.{i}.*"] = {"m2": 2, "n2": 1}
    return resolve_spec({"modules": patterns, "tie_head": tie_head}, config)


def krony_pt_spec(config: GPT2Config, target_params: int | None = None, rank: int = 1) -> dict[str, Any]:
    """Krony-PT: both MLP maps of every layer, one factor shape chosen to land nearest `target_params`.

    The default target is 65.5% of the teacher (81M of GPT-2 small's 124M, Krony-PT's 81M model).
    """
    shapes = weight_shapes(config)
    dense_total = _dense_params(config)
    target = target_params or round(0.655 * dense_total)
    inner, d = shapes["transformer.h.0.mlp.c_fc"]
    mlp_dense = 2 * inner * d * config.n_layer
    best = min(
        factor_shapes(inner, d, rank),
        key=lambda s: abs(dense_total - mlp_dense + 2 * s.params * config.n_layer - target),
    )
    check_rank(rank, best.m1, best.n1, best.m2, best.n2)
    modules = {}
    for i in range(config.n_layer):
        fc = {"m1": best.m1, "n1": best.n1, "m2": best.m2, "n2": best.n2, "rank": rank}
        modules[f"transformer.h.{i}.mlp.c_fc"] = fc
        proj = {"m1": fc["n1"], "n1": fc["m1"], "m2": fc["n2"], "n2": fc["m2"], "rank": rank}  # Aᵀ ⊗ Bᵀ shapes
        modules[f"transformer.h.{i}.mlp.c_proj"] = proj
    return {"modules": modules, "tie_head": False}


def resolve_spec(spec: dict[str, Any], config: GPT2Config) -> dict[str, Any]:
    """Expand glob patterns and partial shapes ({m2, n2} or {m1, n1}) into explicit per-module factors."""
    shapes = weight_shapes(config)
    modules: dict[str, dict[str, int]] = {}
    for pattern, entry in spec.get("modules", {}).items():
        matched = [path for path in shapes if fnmatch.fnmatchcase(path, pattern)]
        if not matched:
            raise KninferError(f"spec pattern '{pattern}' matches no factorable module")
        for path in matched:
            modules[path] = _full_factors(path, shapes[path], entry)
    return {"modules": modules, "tie_head": spec.get("tie_head", False)}  # KnGPT2Config checks it is a bool


def load_spec_file(path: str | Path, config: GPT2Config) -> dict[str, Any]:
    """A custom spec from JSON: {"modules": {pattern: {"m2": .., "n2": .., "rank": ..}}, "tie_head": ..}."""
    try:
        spec = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError) as error:  # ValueError: bad UTF-8 or JSON
        raise KninferError(f"cannot read spec file '{path}': {error}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("modules"), dict):
        raise KninferError(f"spec file '{path}' must hold an object with a \"modules\" object")
    return resolve_spec(spec, config)


def _full_factors(path: str, shape: tuple[int, int], entry: Any) -> dict[str, int]:
    """One module's explicit m1, n1, m2, n2 and rank from a spec entry with {m2, n2} or {m1, n1} (rank 1 unless set)."""
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
        m1, n1, m2, n2 = (factors[key] for key in FACTORS[:4])
        check_divides(out_features, in_features, m1, n1, m2, n2)
        check_rank(factors["rank"], m1, n1, m2, n2)
    except KninferError as error:
        raise KninferError(f"'{path}': {error}") from None
    return {key: factors[key] for key in FACTORS}


def _dense_params(config: GPT2Config) -> int:
    """Parameters of the dense GPT-2 with this config, head tied (as GPT-2 counts)."""
    d, inner = config.n_embd, config.n_inner or 4 * config.n_embd
    block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (inner * d + inner) + (d * inner + d)
    return config.vocab_size * d + config.n_positions * d + config.n_layer * block + 2 * d
