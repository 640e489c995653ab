"""ONNX export of the Llama family (GQA, RoPE, RMSNorm, SwiGLU): onnxruntime matches PyTorch, Kronecker layers stay
factored, and the graph keeps docs/architecture.md's "ONNX graph rules"."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from test_export import TOL, _graph, holding, initializers
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from kninfer.export import export_bundle
from kninfer.export.verify import left_padded_batch
from kninfer.kron import KroneckerLinear
from kninfer.modeling.compress import compress
from kninfer.runtime.session import CausalLM

TINY = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
        "intermediate_size": 128, "vocab_size": 256, "max_position_embeddings": 128, "tie_word_embeddings": True,
        "rope_theta": 1e4}
KRONECKER = {"model.layers.0.self_attn.q_proj": (8, 8, 8, 8), "model.layers.0.mlp.down_proj": (8, 16, 8, 8)}


def random_llama(cls: type = LlamaForCausalLM, **overrides) -> torch.nn.Module:
    """A random Llama of TINY's sizes (seeded), in eval mode."""
    torch.manual_seed(0)
    return cls(LlamaConfig(**TINY, **overrides)).eval()


@pytest.fixture(scope="module")
def models():
    """The dense tiny Llama, and one with KRONECKER's layers swapped for Kronecker layers (bias-free, as knllama)."""
    kron = random_llama()
    for path, shape in KRONECKER.items():
        parent, name = path.rsplit(".", 1)
        dense = kron.get_submodule(path)
        setattr(kron.get_submodule(parent), name, KroneckerLinear.from_dense(dense.weight.detach(), None, *shape))
    return {"llama": random_llama(), "kron": kron}


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory):
    """Each model exported fp32 with the export's own verification on (it raises past the tolerance)."""
    folder = tmp_path_factory.mktemp("llama")
    exported = {name: export_bundle(model, folder / name / "m.onnx", task="causal-lm", variant="fp32")
                for name, model in models.items()}
    plain = export_bundle(models["llama"], folder / "plain" / "m.onnx", task="causal-lm", fused_attention=False)
    return {**exported, "llama-plain": plain}


@pytest.mark.parametrize("name", ["llama", "kron"])
def test_export_verifies(exported, name):
    report = exported[name]
    assert report.verification.max_abs_diff <= TOL
    entry = json.loads((report.onnx_path.parent / "kninfer.json").read_text())["models"]["m.onnx"]
    assert entry["model_type"] == "llama" and entry["context_length"] == 128
    assert {k: entry["kv_cache"][k] for k in ("num_layers", "num_heads", "head_dim")} == {
        "num_layers": 2, "num_heads": 2, "head_dim": 16}


@pytest.mark.parametrize("name", ["llama", "kron"])
def test_greedy_decoding_matches_generate(models, exported, name, runtime_greedy):
    """CausalLM prefill + steps on a left-padded batch give transformers' greedy tokens, token for token."""
    model, new_tokens = models[name], 10
    ids, mask = left_padded_batch(TINY["vocab_size"], [7, 4], seed=3)
    want = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), do_sample=False,
                          max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
    lm = CausalLM(_graph(exported[name].onnx_path), threads=1)
    np.testing.assert_array_equal(runtime_greedy(lm, ids, mask, new_tokens), want[:, ids.shape[1]:].numpy())


def test_kronecker_layers_stay_factored(models, exported):
    model, path = models["kron"], exported["kron"].onnx_path
    inits = initializers(path)
    matmul_inputs = {name for n in onnx.load(str(path)).graph.node if n.op_type == "MatMul" for name in n.input}
    for layer_path in KRONECKER:
        layer = model.get_submodule(layer_path)
        assert not holding(inits, layer.to_dense()), f"{layer_path}: dense weight in the graph"
        for factor in (layer.A, layer.B):
            assert set(holding(inits, factor)) & matmul_inputs, f"{layer_path}: a factor is not a MatMul operand"


@pytest.mark.parametrize("name", ["llama", "kron"])
def test_blocks_reshape_to_constant_targets(exported, name):
    """No size-based reshape (Shape node) inside a block, every block Reshape to a constant target, one mask."""
    graph = onnx.load(str(exported[name].onnx_path)).graph
    constants = {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant"
                                                       for o in n.output}
    blocks = [n for n in graph.node if "/layers." in n.name]
    assert not [n.name for n in blocks if n.op_type == "Shape"]
    assert not [n.name for n in blocks if n.op_type == "Reshape" and n.input[1] not in constants]
    assert sum(n.op_type == "Where" for n in graph.node) == 1


@pytest.mark.parametrize("name", ["llama", "kron", "llama-plain"])
def test_transposes_only_in_attention(exported, name):
    """Transposes (the unfused graph's) only split and merge heads and turn keys; none reads a weight. The fused
    graph has none."""
    graph = onnx.load(str(exported[name].onnx_path)).graph
    weights = {t.name for t in graph.initializer}
    transposes = [n for n in graph.node if n.op_type == "Transpose"]
    assert bool(transposes) == (name == "llama-plain")
    assert all("/self_attn/" in n.name and n.input[0] not in weights for n in transposes)


def test_grouped_queries_read_each_kv_head_once(exported):
    """GQA without repeating K/V: the scores and values MatMuls read each layer's cache as is, with the query
    heads grouped per KV head (the --no-fused-attention graph; fused, GroupQueryAttention reads the cache)."""
    path = exported["llama-plain"].onnx_path
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    graph, kv_heads = model.graph, TINY["num_key_value_heads"]
    shapes = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim] for v in graph.value_info}
    assert not [n.name for n in graph.node if n.op_type in ("Expand", "Tile")]
    for i in range(TINY["num_hidden_layers"]):
        (turned,) = [n.output[0] for n in graph.node if n.op_type == "Transpose" and n.input[0] == f"present.{i}.key"]
        (scores,) = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] == turned]
        (weighted,) = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] == f"present.{i}.value"]
        assert shapes[scores.input[0]][1] == kv_heads and shapes[weighted.input[0]][1] == kv_heads


def test_int8(models, tmp_path):
    report = export_bundle(models["kron"], tmp_path / "int8.onnx", task="causal-lm", variant="int8")
    assert report.agreement is not None and report.agreement > 0.5
    print(f"\ntiny Kronecker Llama int8 top-1 agreement with fp32: {report.agreement:.1%}")
    assert any(n.op_type == "MatMulNBits" for n in onnx.load(str(report.onnx_path)).graph.node)
    ids = np.arange(1, 40, dtype=np.int64)[None]
    assert np.isfinite(CausalLM(_graph(report.onnx_path), threads=1).prefill(ids, np.ones_like(ids))[0]).all()


def test_classification_graph(tmp_path):
    classifier = random_llama(LlamaForSequenceClassification, num_labels=2, pad_token_id=0)
    report = export_bundle(classifier, tmp_path / "cls.onnx", task="sequence-classification")
    assert report.verification.max_abs_diff <= TOL


def test_knllama_student(tiny_llama, tmp_path):
    """A compressed student (Kronecker embedding, tied Kronecker head, every map of the odd layers) exports and
    verifies."""
    student = compress(tiny_llama, "kngpt2")[0].eval()
    report = export_bundle(student, tmp_path / "m.onnx", task="causal-lm")
    assert student.config.model_type == "knllama" and report.kronecker_layers > 0
    assert report.verification.max_abs_diff <= TOL
