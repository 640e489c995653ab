"""The Llama family on the torch side: presets, Kronecker students, save/load, --dense, ILKD pairing, against the
dense Llama they come from."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaForCausalLM

from kninfer.errors import KninferError
from kninfer.export.dense import densify
from kninfer.kron import KroneckerEmbedding, KroneckerLinear
from kninfer.modeling import KnLlamaForCausalLM
from kninfer.modeling.compress import compress, count_parameters
from kninfer.modeling.families import LLAMA, dense_weight, dims
from kninfer.modeling.io import load, save

IDS = torch.tensor([[5, 17, 300, 4096, 50000, 7, 12, 99], [1, 2, 3, 4, 5, 6, 7, 8]])
MAPS = (*LLAMA.attention, *LLAMA.mlp)


def test_kngpt2_preset_on_llama_factors_embedding_and_every_map_of_odd_layers(tiny_llama):
    student, rows = compress(tiny_llama, "kngpt2")
    assert type(student) is KnLlamaForCausalLM and student.config.model_type == "knllama"
    expected = {"model.embed_tokens"} | {f"model.layers.{i}.{name}" for i in (1, 3) for name in MAPS}
    assert {row.path for row in rows} == expected
    k_proj = student.model.layers[1].self_attn.k_proj  # GQA: (2 KV heads x 16, 64)
    assert isinstance(k_proj, KroneckerLinear) and (k_proj.out_features, k_proj.in_features) == (32, 64)
    assert k_proj.bias is None
    # each factor pair is the nearest Kronecker product of the teacher's weight (Van Loan): its error as reported
    for row in rows[1:]:
        W, _ = dense_weight(tiny_llama, row.path)
        error = torch.linalg.norm(dense_weight(student, row.path)[0] - W) / torch.linalg.norm(W)
        assert row.error == pytest.approx(error.item(), rel=1e-4)


def test_tie_head_defaults_to_the_teachers_tied_embeddings(tiny_llama):
    tied, _ = compress(tiny_llama, "kngpt2")
    untied, _ = compress(tiny_llama, "kngpt2", tie_head=False)
    assert isinstance(tied.model.embed_tokens, KroneckerEmbedding) and not isinstance(tied.lm_head, torch.nn.Linear)
    assert count_parameters(tied) < count_parameters(tiny_llama) < count_parameters(untied)
    E = tied.model.embed_tokens.to_dense()
    hidden = torch.randn(2, 3, 64)
    torch.testing.assert_close(tied.lm_head(hidden), hidden @ E.T, atol=1e-5, rtol=1e-4)


def test_exact_kronecker_weights_give_the_teachers_logits(tiny_llama_config):
    """A teacher whose chosen weights are exact Kronecker products compresses without error: same logits."""
    torch.manual_seed(1)
    teacher = LlamaForCausalLM(tiny_llama_config).eval()
    paths = [f"model.layers.{i}.{name}" for i in (1, 3) for name in MAPS]
    with torch.no_grad():
        for path in paths:
            layer = teacher.get_submodule(path)
            out_features, in_features = layer.weight.shape
            A, B = torch.randn(out_features // 2, in_features), torch.randn(2, 1)
            layer.weight.copy_(torch.kron(A, B) * 0.05)
    student, rows = compress(teacher, "kngpt2", tie_head=False)
    student = _without_embedding_rows(student, teacher)
    assert max(row.error for row in rows if row.path in paths) < 1e-6
    torch.testing.assert_close(student(IDS).logits, teacher(IDS).logits, atol=1e-4, rtol=1e-4)


def _without_embedding_rows(student, teacher):
    """The student with its (approximate) Kronecker embedding and head replaced by the teacher's dense ones."""
    dense = densify(student)
    with torch.no_grad():
        dense.model.embed_tokens.weight.copy_(teacher.model.embed_tokens.weight)
        dense.lm_head.weight.copy_(teacher.lm_head.weight)
    return dense


def test_krony_pt_factors_all_three_swiglu_maps(tiny_llama):
    student, rows = compress(tiny_llama, "krony-pt")
    assert {row.path for row in rows} == {f"model.layers.{i}.mlp.{m}" for i in range(4)
                                          for m in ("gate_proj", "up_proj", "down_proj")}
    mlp = student.model.layers[0].mlp
    assert (mlp.gate_proj.m1, mlp.gate_proj.n1) == (mlp.down_proj.n1, mlp.down_proj.m1)  # down: the transposed shapes
    saved = sum(row.params_before - row.params_after for row in rows)
    assert count_parameters(student) == count_parameters(tiny_llama) - saved
    # a reachable target is met exactly: the teacher less its MLP plus 12 maps of the (16, 16) ⊗ (8, 4) shape
    mlp = 12 * 128 * 64
    reachable = count_parameters(tiny_llama) - mlp + 12 * (16 * 16 + 8 * 4)
    student, rows = compress(tiny_llama, "krony-pt", target_params=reachable)
    assert count_parameters(student) == reachable


def test_distil_keeps_every_other_llama_layer(tiny_llama):
    student, rows = compress(tiny_llama, "distil")
    assert type(student) is LlamaForCausalLM and dims(student.config).layers == 2
    for new, old in ((0, 0), (1, 2)):
        for (name, a), (_, b) in zip(student.model.layers[new].named_parameters(),
                                     tiny_llama.model.layers[old].named_parameters(), strict=True):
            assert torch.equal(a, b), name
    assert [row.after for row in rows] == ["kept", "dropped", "kept", "dropped"]


@pytest.mark.parametrize("suffix", [".pt", ""])
def test_llama_student_save_load_round_trip(tmp_path, tiny_llama, llama_tokenizer, suffix):
    student, _ = compress(tiny_llama, "kngpt2")
    chat = copy.deepcopy(llama_tokenizer)
    chat.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    loaded, tokenizer = load(save(student.eval(), tmp_path / f"student{suffix}", chat))
    assert type(loaded) is KnLlamaForCausalLM and loaded.config.kronecker == student.config.kronecker
    assert torch.equal(loaded(IDS).logits, student(IDS).logits)
    assert tokenizer("hi").input_ids == llama_tokenizer("hi").input_ids
    assert tokenizer.chat_template == chat.chat_template  # the .pt carries it too


def test_gguf_or_onnx_outputs_are_refused(tmp_path, tiny_llama):
    for name in ("student.gguf", "student.onnx"):
        with pytest.raises(KninferError, match="not .(gguf|onnx)"):
            save(tiny_llama, tmp_path / name)
        assert not (tmp_path / name).exists()


@pytest.mark.parametrize("tie_head", [True, False])
def test_densify_llama_student_computes_the_same(tiny_llama, tie_head):
    student, _ = compress(tiny_llama, "kngpt2", tie_head=tie_head)
    dense = densify(student.eval())
    assert type(dense) is LlamaForCausalLM and dense.config.tie_word_embeddings is tie_head
    assert not any(isinstance(m, (KroneckerLinear, KroneckerEmbedding)) for m in dense.modules())
    torch.testing.assert_close(dense(IDS).logits, student(IDS).logits, atol=1e-5, rtol=1e-4)


def test_custom_spec_by_module_path(tmp_path, tiny_llama):
    spec = tmp_path / "spec.json"
    spec.write_text('{"modules": {"model.layers.*.self_attn.v_proj": {"m1": 8, "n1": 8, "rank": 2}}}')
    student, rows = compress(tiny_llama, str(spec))
    assert len(rows) == 4 and all(row.after == "(8, 8) ⊗ (4, 8) ×2" for row in rows)
    spec.write_text('{"modules": {"model.layers.0.mlp.c_fc": {"m2": 2, "n2": 1}}}')  # a GPT-2 path
    with pytest.raises(KninferError, match="matches no factorable module"):
        compress(tiny_llama, str(spec))


def test_ilkd_refuses_other_kv_heads(tiny_llama, tiny_llama_config):
    from kninfer.train.trainer import _check_pairable

    other = LlamaForCausalLM(tiny_llama_config.__class__(**{**tiny_llama_config.to_dict(), "num_key_value_heads": 4}))
    with pytest.raises(KninferError, match="2 KV"):
        _check_pairable(other, tiny_llama)
    _check_pairable(compress(tiny_llama, "kngpt2")[0], tiny_llama)
