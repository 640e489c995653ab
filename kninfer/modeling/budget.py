"""Factor shapes and ranks chosen per map for a parameter budget, by calibrated output error.

Each map (out, in) is offered a few factor shapes: low rank, A (out, 1) ⊗ B (1, in), and Kronecker shapes whose A is
a small grid (block sharing), every rank of each whose multiply-adds stay under the dense map's, or staying dense.
The output error of each (shape, rank) is read from one SVD per shape: the singular values of the rearranged,
input-whitened weight (activation_fit.py) left out by rank r, over their total (exact for low rank, an estimate for
the others). A Lagrange multiplier trades error against parameters across all maps and is searched until the total
fits the budget, as rate-distortion allocation does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kninfer.activation_fit import whitened_spectrum
from kninfer.errors import KninferError
from kninfer.kron import FactorShape
from kninfer.modeling.calibrate import input_moments
from kninfer.modeling.configuration_kronecker import KroneckerSpec
from kninfer.modeling.families import dense_weight
from kninfer.modeling.presets import block_maps, map_budget

GRIDS = ((1, 2), (2, 1), (2, 2), (4, 4), (8, 8))  # A's (m1, n1) of the block-sharing shapes


@dataclass(frozen=True)
class Option:
    """One way to store a map: factor shapes (None: dense), its parameters and estimated relative output error."""

    shape: FactorShape | None
    params: int
    error: float


def candidate_shapes(out_features: int, in_features: int) -> list[FactorShape]:
    """The rank-1 factor shapes offered to an (out, in) map: low rank, then the small-A grids that divide it."""
    shapes = [FactorShape(out_features, 1, 1, in_features)]
    shapes += [FactorShape(m1, n1, out_features // m1, in_features // n1) for m1, n1 in GRIDS
               if out_features % m1 == 0 and in_features % n1 == 0]
    return shapes


def options(weight: torch.Tensor, moment: torch.Tensor) -> list[Option]:
    """Every (shape, rank) of `weight` no costlier than dense in parameters or multiply-adds, and dense itself."""
    out_features, in_features = weight.shape
    dense = out_features * in_features
    found = [Option(None, dense, 0.0)]
    for base in candidate_shapes(out_features, in_features):
        energy = whitened_spectrum(weight, moment, base).pow(2)
        left = 1 - energy.cumsum(0) / energy.sum()
        for rank in range(1, len(energy) + 1):
            shape = FactorShape(base.m1, base.n1, base.m2, base.n2, rank)
            if shape.params >= dense or shape.macs > dense:
                break
            found.append(Option(shape, shape.params, max(float(left[rank - 1]), 0.0)))
    return found


def allocate(choices: dict[str, list[Option]], budget: int) -> dict[str, Option]:
    """The option per map minimising the summed error with at most `budget` parameters in all maps."""
    least = sum(min(option.params for option in found) for found in choices.values())
    if least > budget:
        raise KninferError(f"a budget of {budget:,} parameters for these maps is below their smallest form "
                           f"({least:,})")
    low, high = 0.0, 1.0
    while _total(_pick(choices, high)) > budget:
        high *= 2
    for _ in range(60):  # bisection on the multiplier: price per parameter
        middle = (low + high) / 2
        low, high = (middle, high) if _total(_pick(choices, middle)) > budget else (low, middle)
    return _pick(choices, high)


def auto_spec(teacher: nn.Module, calibration: torch.Tensor, target_params: int) -> KroneckerSpec:
    """Shapes and ranks of every block map chosen for a student of `target_params` by output error on the teacher's
    calibration activations (maps the allocation leaves dense are not listed)."""
    paths = block_maps(teacher)
    moments = input_moments(teacher, paths, calibration)
    choices = {path: options(dense_weight(teacher, path)[0].detach(), moments[path]) for path in paths}
    picked = allocate(choices, map_budget(teacher, paths, target_params))
    return KroneckerSpec({path: option.shape for path, option in picked.items() if option.shape is not None})


def _pick(choices: dict[str, list[Option]], price: float) -> dict[str, Option]:
    return {path: min(found, key=lambda o: o.error + price * o.params) for path, found in choices.items()}


def _total(picked: dict[str, Option]) -> int:
    return sum(option.params for option in picked.values())
