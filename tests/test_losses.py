"""ILKD and vanilla KD terms: zero for an exact copy, positive otherwise; attention KL against a float64 reference."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from kninfer.errors import KninferError
from kninfer.train.losses import PAPER, Recipe, loss_recipe, loss_terms, relative_mse, soft_target_loss
from kninfer.train.trainer import use_eager_attention

KD_TERMS = ("embedding", "attention", "hidden")


def _eager(model):
    model = copy.deepcopy(model).eval()
    use_eager_attention(model)
    return model


@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    return _eager(tiny_teacher)


@pytest.fixture(scope="module")
def student(tiny_teacher):
    """The teacher compressed with the KnGPT2 preset: every KD term differs from the teacher's."""
    from kninfer.modeling.compress import compress

    return _eager(compress(tiny_teacher, "kngpt2")[0])


@pytest.fixture(scope="module")
def batch():
    """Two rows, the second right-padded after 5 tokens."""
    torch.manual_seed(1)
    ids = torch.randint(0, 50257, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _outputs(model, batch):
    with torch.no_grad():
        return model(**batch, output_hidden_states=True, output_attentions=True)


def test_terms_zero_for_exact_copy(teacher, batch):
    t = _outputs(teacher, batch)
    s = _outputs(_eager(teacher), batch)
    terms = loss_terms("ilkd", s, t, batch["attention_mask"])
    for name in KD_TERMS:
        assert abs(terms[name].item()) < 1e-6, name
    assert abs(loss_terms("vanilla", s, t, batch["attention_mask"])["kd"].item()) < 1e-6
    assert terms["ce"].item() == pytest.approx(t.loss.item(), rel=1e-6)


def test_terms_positive_for_different_student(teacher, student, batch):
    t, s = _outputs(teacher, batch), _outputs(student, batch)
    terms = loss_terms("ilkd", s, t, batch["attention_mask"]) | loss_terms("vanilla", s, t, batch["attention_mask"])
    for name in (*KD_TERMS, "kd", "ce"):
        assert terms[name].item() > 1e-4, name


def _attention_maps(model, batch) -> list[np.ndarray]:
    """Each layer's attention distribution recomputed by hand in float64 from the layer's input hidden states."""
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"].numpy().astype(bool)
    n_head, seq = model.config.n_head, mask.shape[1]
    allowed = np.tril(np.ones((seq, seq), bool))[None] & mask[:, None, :]  # (batch, query, key)
    maps = []
    for layer, block in enumerate(model.transformer.h):
        with torch.no_grad():
            x = block.ln_1(hidden[layer])
            attn = block.attn
            if hasattr(attn, "c_attn") and hasattr(attn.c_attn, "q"):  # KnGPT2 SplitQKV
                q, k = attn.c_attn.q(x), attn.c_attn.k(x)
            else:
                q, k, _ = attn.c_attn(x).split(model.config.n_embd, dim=-1)
        q, k = (t.double().numpy().reshape(*t.shape[:2], n_head, -1).transpose(0, 2, 1, 3) for t in (q, k))
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
        scores = np.where(allowed[:, None], scores, -np.inf)
        scores -= scores.max(-1, keepdims=True)
        p = np.exp(scores)
        maps.append(p / p.sum(-1, keepdims=True))
    return maps


def _kl_reference(p: list[np.ndarray], q: list[np.ndarray], mask: np.ndarray) -> float:
    """Σ_layers mean over heads and non-padded queries of Σ_keys p log(p/q), written as explicit loops."""
    total = 0.0
    for pl, ql in zip(p, q, strict=True):
        per_query = []
        for b in range(mask.shape[0]):
            for i in range(mask.shape[1]):
                if mask[b, i]:
                    heads = [sum(pl[b, h, i, j] * np.log(pl[b, h, i, j] / ql[b, h, i, j])
                                 for j in range(mask.shape[1]) if pl[b, h, i, j] > 0) for h in range(pl.shape[1])]
                    per_query.append(np.mean(heads))
        total += np.mean(per_query)
    return total


@pytest.fixture(scope="module")
def peaked(teacher):
    """The teacher with q and k scaled up: sharp attention, far from the teacher's near-uniform maps."""
    model = _eager(teacher)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight[:, : 2 * model.config.n_embd] *= 8.0
    return model


@pytest.mark.parametrize("which", ["student", "peaked"])
def test_attention_kl_matches_float64_reference(teacher, which, request, batch):
    """The attention term is KL(teacher ‖ student), not the reverse, with padded queries excluded."""
    student = request.getfixturevalue(which)
    t_maps, s_maps = _attention_maps(teacher, batch), _attention_maps(student, batch)
    mask = batch["attention_mask"].numpy()
    got = loss_terms("ilkd", _outputs(student, batch), _outputs(teacher, batch), batch["attention_mask"])["attention"]
    forward, reverse = _kl_reference(t_maps, s_maps, mask), _kl_reference(s_maps, t_maps, mask)
    assert got.item() == pytest.approx(forward, rel=1e-4, abs=1e-7)
    if which == "peaked":  # here the two directions differ clearly
        assert abs(forward - reverse) > 0.1 * forward


def test_padded_positions_do_not_count(teacher, student, batch):
    """Changing the tokens under padding changes no KD term."""
    other = dict(batch, input_ids=batch["input_ids"].clone())
    other["input_ids"][1, 5:] = 7
    mask = batch["attention_mask"]
    a = loss_terms("ilkd", _outputs(student, batch), _outputs(teacher, batch), mask)
    b = loss_terms("ilkd", _outputs(student, other), _outputs(teacher, other), mask)
    for name in KD_TERMS:
        assert a[name].item() == pytest.approx(b[name].item(), rel=1e-5), name


def test_soft_target_loss_matches_reference():
    torch.manual_seed(0)
    s, t = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    tau = 2.0
    ps, pt = (np.exp(x.numpy() / tau) / np.exp(x.numpy() / tau).sum(-1, keepdims=True) for x in (s, t))
    expected = tau**2 * np.mean(np.sum(pt * np.log(pt / ps), -1))
    assert soft_target_loss(s, t, torch.ones(6), tau).item() == pytest.approx(expected, rel=1e-10)


def test_relative_hidden_term_matches_reference(teacher, student, batch):
    """kninfer's hidden term: mean over layers of ‖s − t‖²/‖t‖² per position, averaged over non-padded positions."""
    t, s = _outputs(teacher, batch), _outputs(student, batch)
    mask = batch["attention_mask"].numpy().astype(bool)
    per_layer = []
    for s_h, t_h in zip(s.hidden_states[1:], t.hidden_states[1:], strict=True):
        s_h, t_h = s_h.double().numpy()[mask], t_h.double().numpy()[mask]  # (positions, features)
        per_layer.append(np.mean(((s_h - t_h) ** 2).sum(-1) / (t_h**2).sum(-1)))
    got = loss_terms("ilkd", s, t, batch["attention_mask"], hidden="relative")["hidden"]
    assert got.item() == pytest.approx(np.mean(per_layer), rel=1e-5)
    paper = loss_terms("ilkd", s, t, batch["attention_mask"], hidden="mse")["hidden"]
    assert abs(paper.item() - got.item()) > 1e-3 * got.item()  # two different measures


def test_relative_mse_ignores_each_positions_scale():
    """Scaling one position's states (student and teacher alike) leaves the relative error unchanged; MSE grows."""
    torch.manual_seed(0)
    t = torch.randn(1, 4, 8, dtype=torch.float64)
    s = t + 0.1 * torch.randn_like(t)
    scale = torch.tensor([1.0, 100.0, 1.0, 1.0], dtype=torch.float64)[None, :, None]
    mask = torch.ones(1, 4)
    assert relative_mse(s * scale, t * scale, mask).item() == pytest.approx(relative_mse(s, t, mask).item(), rel=1e-12)


def test_recipes_by_name_weights_or_object():
    default = loss_recipe("ilkd", None, finetune=False)
    assert (default.weights, default.hidden) == ({"embedding": 0.0, "attention": 0.0, "hidden": 1.0, "ce": 1.0},
                                                 "relative")
    paper = loss_recipe("ilkd", "paper", finetune=False)
    assert (paper.weights, paper.hidden) == ({"embedding": 0.5, "attention": 0.5, "hidden": 0.5, "ce": 0.1}, "mse")
    assert loss_recipe("ilkd", None, finetune=True) == PAPER[("ilkd", True)]  # fine-tuning keeps the paper's
    assert loss_recipe("ilkd", [1, 2, 3, 4], finetune=False) == Recipe(
        {"embedding": 1.0, "attention": 2.0, "hidden": 3.0, "ce": 4.0}, "relative")
    assert loss_recipe("ilkd", Recipe(paper.weights, "mse"), finetune=False) == paper
    assert loss_recipe("vanilla", "paper", finetune=False).weights == {"kd": 0.5, "ce": 0.5}
    with pytest.raises(KninferError, match="'paper' or comma-separated"):
        loss_recipe("ilkd", "papers", finetune=False)
    with pytest.raises(KninferError, match="hidden form"):
        loss_recipe("ilkd", Recipe(paper.weights, "cosine"), finetune=False)
    with pytest.raises(KninferError, match="takes 4"):
        loss_recipe("ilkd", [1, 2], finetune=False)
