"""Calibration on a few thousand tokens: input second moments of chosen maps, block influence, and the layer-by-layer
refit of a student's Kronecker factors to its teacher's outputs.

The refit is sequential, as GPTQ calibrates: block i is fitted on the activations of the student whose blocks before
it are already refitted, and inside a block the maps that read one input (q, k, v; gate, up) are fitted together
before the maps after them see their new inputs. Blocks are called directly with the arguments the model passed to
its first block, so any family whose blocks take the hidden states first works unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from kninfer.activation_fit import fit_kronecker, output_error, second_moment
from kninfer.kron import FactorShape, KroneckerLinear
from kninfer.modeling.families import dense_weight, dims, family_of, input_module

Moments = dict[str, torch.Tensor]  # module path -> E[x xᵀ] of its inputs (float64)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once it has what it came for."""


@torch.no_grad()
def input_moments(model: nn.Module, paths: list[str], calibration: torch.Tensor) -> Moments:
    """E[x xᵀ] of the inputs of each module in `paths` over the calibration sequences (N, T), in one pass."""
    sums: dict[str, torch.Tensor] = {}
    with _evaluating(model), _capturing(model, paths, lambda path, x: _accumulate(sums, path, x)):
        for sequence in calibration:
            model(sequence[None])
    return {path: total / calibration.numel() for path, total in sums.items()}


@torch.no_grad()
def block_influence(model: nn.Module, calibration: torch.Tensor) -> list[float]:
    """Each block's mean angular change of the hidden state, 1 - cos(input, output) over calibration tokens
    (ShortGPT's block influence): the blocks that change it least are the cheapest to drop."""
    family = family_of(model.config)
    totals = [0.0] * dims(model.config).layers
    with _evaluating(model):
        for hidden, args, kwargs in _block_inputs(model, calibration):
            for i in range(len(totals)):
                output = _hidden(model.get_submodule(family.block(i))(hidden, *args, **kwargs))
                totals[i] += (1 - torch.cosine_similarity(hidden, output, dim=-1)).sum().item()
                hidden = output
    return [total / calibration.numel() for total in totals]


@torch.no_grad()
def refit(student: nn.Module, teacher: nn.Module, calibration: torch.Tensor, sweeps: int = 8,
          progress: Callable[[str], None] | None = None) -> dict[str, float]:
    """Refit every KroneckerLinear inside the student's blocks to the teacher's weight on the student's own
    calibration activations; returns each map's relative output error on them."""
    with _evaluating(student):
        return _refit(student, teacher, calibration, sweeps, progress)


def _refit(student: nn.Module, teacher: nn.Module, calibration: torch.Tensor, sweeps: int,
           progress: Callable[[str], None] | None) -> dict[str, float]:
    family = family_of(student.config)
    sequences = _block_inputs(student, calibration)
    hiddens = [hidden for hidden, _, _ in sequences]
    _, args, kwargs = sequences[0]
    errors = {}
    for i in range(dims(student.config).layers):
        block = student.get_submodule(family.block(i))
        pending = {f"{family.block(i)}.{name}": module for name, module in block.named_modules()
                   if isinstance(module, KroneckerLinear)}
        while pending:
            moments, first_readers = _block_moments(block, pending, hiddens, args, kwargs)
            for path in first_readers:
                module = pending.pop(path)
                weight, _ = dense_weight(teacher, path)
                shape = FactorShape(module.m1, module.n1, module.m2, module.n2, module.rank)
                A, B = fit_kronecker(weight, moments[path], shape, sweeps)
                module.A.copy_(A)
                module.B.copy_(B)
                errors[path] = output_error(weight, A, B, moments[path])
        hiddens = [_hidden(block(hidden, *args, **kwargs)) for hidden in hiddens]
        if progress:
            progress(f"refit block {i + 1}/{dims(student.config).layers}")
    return errors


def _block_moments(block: nn.Module, pending: dict[str, nn.Module], hiddens: list[torch.Tensor],
                   args: tuple, kwargs: dict[str, Any]) -> tuple[Moments, list[str]]:
    """Input moments of the pending maps over every sequence, and the maps that read the first input among them."""
    sums: dict[str, torch.Tensor] = {}
    reads: list[tuple[torch.Tensor, list[str]]] = []  # each input in call order with the maps that read it

    def record(path: str, x: torch.Tensor) -> None:
        _accumulate(sums, path, x)
        if reads and reads[-1][0] is x:
            reads[-1][1].append(path)
        else:
            reads.append((x, [path]))

    with _capturing(block, pending, record):
        for hidden in hiddens:
            block(hidden, *args, **kwargs)
    tokens = sum(hidden.shape[:-1].numel() for hidden in hiddens)
    return {path: total / tokens for path, total in sums.items()}, reads[0][1]


def _block_inputs(model: nn.Module, calibration: torch.Tensor) -> list[tuple[torch.Tensor, tuple, dict]]:
    """(hidden states, other positional args, keyword args) that the model passes its first block, per sequence."""
    first = model.get_submodule(family_of(model.config).block(0))
    captured: dict[str, Any] = {}

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.update(args=args, kwargs=kwargs)
        raise _Stop

    inputs = []
    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for sequence in calibration:
            try:
                model(sequence[None], use_cache=False)
            except _Stop:
                inputs.append((captured["args"][0], captured["args"][1:], captured["kwargs"]))
    finally:
        handle.remove()
    return inputs


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """The model in eval mode (no dropout) for the duration, then back in the mode it was in."""
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


@contextmanager
def _capturing(model: nn.Module, modules: list[str] | dict[str, nn.Module],
               record: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Call record(path, input) each time a module runs: `modules` are paths in `model`, or path -> module."""
    found = modules if isinstance(modules, dict) else {path: input_module(model, path) for path in modules}
    hooks = [module.register_forward_pre_hook(_pre_hook(path, record)) for path, module in found.items()]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def _pre_hook(path: str, record: Callable[[str, torch.Tensor], None]) -> Callable:
    def hook(_module: nn.Module, args: tuple) -> None:
        record(path, args[0])
    return hook


def _accumulate(sums: dict[str, torch.Tensor], path: str, x: torch.Tensor) -> None:
    moment = second_moment(x)
    sums[path] = sums[path] + moment if path in sums else moment


def _hidden(output: torch.Tensor | tuple) -> torch.Tensor:
    """A block's hidden states, whether it returns them alone (Llama) or first in a tuple (GPT-2)."""
    return output[0] if isinstance(output, tuple) else output
