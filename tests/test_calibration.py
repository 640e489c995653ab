"""Data-aware compression: output-error fits against gradient descent and closed forms, calibration against the
dense model's own activations, the budget allocation against brute force, and the presets that use them."""

from __future__ import annotations

import copy
import itertools
import subprocess
import sys

import pytest
import torch

from kninfer.activation_fit import fit_kronecker, output_error, second_moment, whitened_spectrum
from kninfer.errors import KninferError
from kninfer.kron import FactorShape, KroneckerLinear, kron_sum, nearest_kronecker
from kninfer.modeling.budget import Option, allocate
from kninfer.modeling.calibrate import block_influence, input_moments, refit
from kninfer.modeling.compress import compress, count_parameters, factor
from kninfer.modeling.families import dense_weight, weight_shapes
from kninfer.modeling.io import load
from kninfer.modeling.presets import block_maps, resolve_spec


def correlated_inputs(count: int, width: int, seed: int = 0) -> torch.Tensor:
    """Inputs with an uneven, correlated second moment, as a layer's activations have."""
    generator = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=generator, dtype=torch.float64)
    scale = torch.rand(width, generator=generator, dtype=torch.float64) * 3
    return torch.randn(count, width, generator=generator, dtype=torch.float64) @ mix * scale


def descended(W: torch.Tensor, C: torch.Tensor, shape: FactorShape, steps: int = 2500) -> float:
    """The output error Adam reaches from Van Loan's factors: an independent route to the optimum."""
    A, B = (t.clone().requires_grad_() for t in nearest_kronecker(W, shape.m1, shape.n1, shape.m2, shape.n2,
                                                                   shape.rank))
    root = torch.linalg.cholesky(C)
    optimiser = torch.optim.Adam([A, B], lr=1e-2)
    for _ in range(steps):
        loss = ((W - kron_sum(A, B)) @ root).pow(2).sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return output_error(W, A.detach(), B.detach(), C)


W = torch.randn(24, 18, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
X = correlated_inputs(3000, 18)
C = second_moment(X) / len(X)


@pytest.mark.parametrize("shape", [FactorShape(4, 3, 6, 6), FactorShape(4, 3, 6, 6, rank=3)])
def test_fit_reaches_the_optimum_gradient_descent_finds(shape):
    A, B = fit_kronecker(W, C, shape, sweeps=40)
    fitted = output_error(W, A, B, C)
    assert fitted == pytest.approx(descended(W, C, shape), rel=2e-3)
    assert fitted < output_error(W, *nearest_kronecker(W, 4, 3, 6, 6, shape.rank), C) * 0.95


def test_output_error_is_the_error_on_the_inputs():
    A, B = fit_kronecker(W, C, FactorShape(4, 3, 6, 6), sweeps=2)
    K = kron_sum(A, B)
    direct = ((X @ (W - K).T).pow(2).sum() / (X @ W.T).pow(2).sum()).item()
    assert output_error(W, A, B, C) == pytest.approx(direct, rel=1e-9)


def test_identity_inputs_give_van_loan():
    A, B = fit_kronecker(W, torch.eye(18, dtype=torch.float64), FactorShape(4, 3, 6, 6, rank=2))
    assert torch.allclose(kron_sum(A, B), kron_sum(*nearest_kronecker(W, 4, 3, 6, 6, 2)), atol=1e-6)


def test_low_rank_is_the_whitened_svd_and_its_spectrum_gives_every_rank():
    values, vectors = torch.linalg.eigh(C)
    root, inverse = (vectors * values.sqrt()) @ vectors.T, (vectors / values.sqrt()) @ vectors.T
    U, S, Vh = torch.linalg.svd(W @ root)
    energy = whitened_spectrum(W, C, FactorShape(24, 1, 1, 18)).pow(2)
    for rank in (1, 4, 9):
        A, B = fit_kronecker(W, C, FactorShape(24, 1, 1, 18, rank))
        closed_form = (U[:, :rank] * S[:rank]) @ Vh[:rank] @ inverse
        assert torch.allclose(kron_sum(A, B), closed_form, atol=1e-5)  # the fit's ridge: 1e-6 of the mean variance
        assert output_error(W, A, B, C) == pytest.approx(float(1 - energy[:rank].sum() / energy.sum()), abs=1e-6)


def test_allocation_is_optimal_for_the_parameters_it_spends():
    generator = torch.Generator().manual_seed(0)
    choices = {}
    for name in "abcd":  # convex-ish error curves: more parameters, less error
        params = sorted(torch.randint(1, 100, (5,), generator=generator).tolist())
        errors = sorted(torch.rand(5, generator=generator).tolist(), reverse=True)
        choices[name] = [Option(None, p, e) for p, e in zip(params, errors, strict=True)]
    for budget in (60, 150, 250):
        picked = allocate(choices, budget)
        spent = sum(o.params for o in picked.values())
        best = min(sum(o.error for o in combo) for combo in itertools.product(*choices.values())
                   if sum(o.params for o in combo) <= spent)
        assert spent <= budget and sum(o.error for o in picked.values()) == pytest.approx(best)
    with pytest.raises(KninferError, match="below their smallest form"):
        allocate(choices, 3)


def test_moments_are_those_of_the_dense_models_own_inputs(tiny_llama):
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    moments = input_moments(tiny_llama, ["model.layers.1.self_attn.q_proj", "model.layers.1.mlp.up_proj"], ids)
    with torch.no_grad():
        hidden = tiny_llama(ids, output_hidden_states=True).hidden_states[1]
        x = tiny_llama.model.layers[1].input_layernorm(hidden).reshape(-1, 64).double()
    assert torch.allclose(moments["model.layers.1.self_attn.q_proj"], x.T @ x / 32, rtol=1e-5, atol=1e-8)
    assert moments["model.layers.1.mlp.up_proj"].shape == (64, 64)


@pytest.mark.parametrize("model", ["tiny_teacher", "tiny_llama"])
def test_refit_fits_each_map_to_its_own_inputs_better_than_van_loan(model, request):
    teacher = request.getfixturevalue(model)
    spec = resolve_spec({"modules": {"*.0.*": {"m2": 4, "n2": 4, "rank": 2}}}, teacher)
    student, _ = factor(teacher, spec, "van-loan")
    van_loan = {path: (m.A.clone(), m.B.clone()) for path, m in student.named_modules()
                if isinstance(m, KroneckerLinear)}
    ids = torch.randint(0, 1000, (3, 16), generator=torch.Generator().manual_seed(0))
    errors = refit(student, teacher, ids)
    assert set(errors) == set(van_loan)
    first = next(path for path in errors if path.endswith(("q_proj", "c_attn.q")))  # reads the embedding's output
    moment = input_moments(student, [first], ids)[first]
    weight = dense_weight(teacher, first)[0]
    module = student.get_submodule(first)
    assert errors[first] == pytest.approx(output_error(weight, module.A, module.B, moment), rel=1e-6)
    assert errors[first] < output_error(weight, *van_loan[first], moment)


def test_full_rank_calibrated_student_is_the_teacher(tiny_llama):
    spec_file = {"modules": {"model.layers.*": {"m2": 2, "n2": 1, "rank": 2}}}
    student, _ = factor(tiny_llama, resolve_spec(spec_file, tiny_llama), "van-loan")
    refit(student, tiny_llama, torch.randint(0, 1000, (2, 16)))
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        assert torch.allclose(student(ids).logits, tiny_llama(ids).logits, atol=1e-4)


def test_drop_removes_the_block_that_does_nothing(tiny_llama):
    teacher = copy.deepcopy(tiny_llama)
    with torch.no_grad():  # block 2 adds nothing to the residual stream: influence 0
        teacher.model.layers[2].self_attn.o_proj.weight.zero_()
        teacher.model.layers[2].mlp.down_proj.weight.zero_()
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    influence = block_influence(teacher, ids)
    assert influence[2] == pytest.approx(0, abs=1e-6) and min(influence[:2] + influence[3:]) > 1e-4
    block = sum(p.numel() for p in teacher.model.layers[0].parameters())
    student, rows = compress(teacher, "drop", target_params=count_parameters(teacher) - block, calibration=ids)
    assert [row.after for row in rows] == ["kept", "kept", "dropped", "kept"]
    with torch.no_grad():
        assert torch.allclose(student(ids).logits, teacher(ids).logits, atol=1e-5)


def test_drop_then_factor_drops_the_idle_block_and_factors_the_renumbered_rest(tiny_llama):
    teacher = copy.deepcopy(tiny_llama)
    with torch.no_grad():  # block 2 adds nothing to the residual stream: the one to drop
        teacher.model.layers[2].self_attn.o_proj.weight.zero_()
        teacher.model.layers[2].mlp.down_proj.weight.zero_()
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    block = sum(p.numel() for p in teacher.model.layers[0].parameters())
    maps = sum(p.numel() for p in teacher.model.layers[1].mlp.parameters())
    target = count_parameters(teacher) - block - maps // 2
    student, rows = compress(teacher, "odd-mlp", drop=1, target_params=target, calibration=ids)
    assert [(row.path, row.after) for row in rows[:1]] == [("model.layers.2", "dropped")]
    assert sorted(row.path for row in rows[1:]) == [f"model.layers.1.mlp.{name}" for name in ("down_proj", "gate_proj",
                                                                                              "up_proj")]
    assert len(student.model.layers) == 3 and abs(count_parameters(student) - target) <= maps * 0.02
    for kept, original in ((0, 0), (1, 1), (2, 3)):  # attention copied from the teacher's block, renumbered
        assert torch.equal(student.model.layers[kept].self_attn.q_proj.weight,
                           teacher.model.layers[original].self_attn.q_proj.weight)
    assert torch.equal(student.model.layers[2].mlp.up_proj.weight, teacher.model.layers[3].mlp.up_proj.weight)
    with pytest.raises(KninferError, match="only drops blocks"):
        compress(teacher, "drop", drop=1, calibration=ids)
    with pytest.raises(KninferError, match="between 1 and 3"):
        compress(teacher, "odd-mlp", drop=4, calibration=ids)


@pytest.mark.parametrize("preset", ["auto", "svd"])
@pytest.mark.parametrize("model", ["tiny_teacher", "tiny_llama"])
def test_budget_presets_land_on_the_target(preset, model, request):
    teacher = request.getfixturevalue(model)
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    maps = sum(shape[0] * shape[1] for shape in map(weight_shapes(teacher).get, block_maps(teacher)))
    target = count_parameters(teacher) - maps // 2  # the maps at half their size: tiny models are mostly embedding
    student, rows = compress(teacher, preset, target_params=target, calibration=ids)
    assert target - maps * 0.03 <= count_parameters(student) <= target + (0 if preset == "auto" else maps * 0.02)
    assert all(row.output_error is not None and row.output_error < 1 for row in rows)


def test_auto_needs_calibration_and_ratio_is_a_fraction(tiny_llama):
    with pytest.raises(KninferError, match="--calib"):
        compress(tiny_llama, "auto")
    with pytest.raises(KninferError, match="--ratio must be between 0 and 1"):
        compress(tiny_llama, "svd", ratio=1.5)
    with pytest.raises(KninferError, match="not both"):
        compress(tiny_llama, "svd", ratio=0.5, target_params=10)


def test_compress_cli_with_calibration(tmp_path, tiny_teacher_dir, text_file):
    out = tmp_path / "student"
    run = subprocess.run([sys.executable, "-m", "kninfer.cli", "compress", "--teacher", str(tiny_teacher_dir),
                          "--preset", "auto", "--calib", str(text_file), "--calib-tokens", "256", "--ratio", "0.99",
                          "--out", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "output error" in run.stdout
    model, _ = load(out)
    teacher, _ = load(tiny_teacher_dir)
    assert count_parameters(model) <= 0.99 * count_parameters(teacher)


@pytest.mark.parametrize("model", ["tiny_teacher", "tiny_llama"])
def test_odd_mlp_factors_only_the_odd_blocks_mlp_maps_and_lands_on_the_target(model, request):
    teacher = request.getfixturevalue(model)
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    shapes = weight_shapes(teacher)
    odd_mlp = [p for p in block_maps(teacher) if int(p.split(".")[2]) % 2 and ".mlp." in p]
    maps = sum(shapes[p][0] * shapes[p][1] for p in odd_mlp)
    target = count_parameters(teacher) - maps // 2
    student, rows = compress(teacher, "odd-mlp", target_params=target, calibration=ids)
    assert sorted(row.path for row in rows) == sorted(odd_mlp)
    modules = [student.get_submodule(row.path) for row in rows]
    assert all(m.n1 == 1 and m.m2 == 1 and m.rank < min(m.m1, m.n2) for m in modules)  # A columns, B rows: low rank
    assert abs(count_parameters(student) - target) <= maps * 0.02
    with pytest.raises(KninferError, match="below the .* parameters outside the maps"):
        compress(teacher, "odd-mlp", target_params=count_parameters(teacher) - maps, calibration=ids)
    with pytest.raises(KninferError, match="saves nothing"):
        compress(teacher, "odd-mlp", target_params=count_parameters(teacher) - 10, calibration=ids)
