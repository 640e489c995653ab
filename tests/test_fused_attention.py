"""Fused attention (docs/architecture.md, "ONNX graph rules"): each layer's attention core exported as one onnxruntime
contrib node (GPT-2: MultiHeadAttention; Llama: RotaryEmbedding ×2 + GroupQueryAttention) matches PyTorch on
left-padded batches, prefill and cached decode, with the graph's inputs and outputs unchanged and fewer nodes."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import onnx
import pytest
import torch

from kninfer.export import export_bundle
from kninfer.export.bundle import writes_cache_in_place
from kninfer.export.verify import left_padded_batch, verify_causal_lm, verify_classifier
from kninfer.modeling.compress import compress
from kninfer.runtime.bundle import read_bundle, read_models
from kninfer.runtime.session import CausalLM

TOL = 1e-4  # fp32 onnxruntime vs PyTorch, max |Δlogits| (tiny random models: logits RMS below 1)
ATTENTION = ("/attn/", "/self_attn/")  # the node-name scopes of GPT-2's and Llama's attention modules
FUSED_OPS = {"MultiHeadAttention", "GroupQueryAttention", "RotaryEmbedding"}


@pytest.fixture(scope="module")
def models(tiny_teacher, tiny_llama):
    """The conftest's tiny GPT-2 and tiny Llama (GQA: 4 query heads, 2 KV heads), and a kngpt2 student (separately
    factored q/k/v)."""
    return {"gpt2": tiny_teacher, "llama": tiny_llama, "kngpt2": compress(tiny_teacher, "kngpt2")[0].eval()}


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory):
    """Each model exported fused and plain, with the export's own verification (left-padded prefill + 3 cached
    steps against PyTorch; it raises past the tolerance)."""
    folder = tmp_path_factory.mktemp("fused")
    return {(name, fused): export_bundle(model, folder / f"{name}-{fused}" / "m.onnx", fused_attention=fused)
            for name, model in models.items() for fused in (True, False)}


def _graph(path):
    return read_bundle(path, need_tokenizer=False)


def _nodes(path) -> list[onnx.NodeProto]:
    return list(onnx.load(str(path), load_external_data=False).graph.node)


def _io(path) -> list[tuple[str, int, list]]:
    """Names, element types and shapes (static sizes and symbolic names) of the graph's inputs and outputs."""
    graph = onnx.load(str(path), load_external_data=False).graph
    return [(v.name, v.type.tensor_type.elem_type, [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim])
            for v in (*graph.input, *graph.output)]


@pytest.mark.parametrize("name", ["gpt2", "llama", "kngpt2"])
def test_fused_export_verifies(exported, name):
    assert exported[name, True].verification.max_abs_diff <= TOL


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("lengths", [[6], [7, 4, 1]], ids=["batch1", "batch3-left-padded"])
def test_fused_matches_torch_with_padding(models, exported, name, lengths):
    """Prefill of a left-padded batch (one row of a single token) and 4 cached greedy steps."""
    result = verify_causal_lm(models[name], _graph(exported[name, True].onnx_path), lengths=lengths, steps=4, seed=2)
    assert result.max_abs_diff <= TOL


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_greedy_decoding_matches_generate(models, exported, name, runtime_greedy):
    """The runtime's prefill + steps on the fused graph give transformers' greedy tokens on a left-padded batch."""
    model, new_tokens = models[name], 8
    ids, mask = left_padded_batch(model.config.vocab_size, [7, 3], seed=3)
    want = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), do_sample=False,
                          max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
    lm = CausalLM(_graph(exported[name, True].onnx_path), threads=1)
    np.testing.assert_array_equal(runtime_greedy(lm, ids, mask, new_tokens), want[:, ids.shape[1]:].numpy())


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_fused_and_plain_graphs_agree_on_a_multi_token_step(models, exported, name):
    """A step of several tokens after a cache (batch 1: GroupQueryAttention's limit; MultiHeadAttention has none)
    gives the plain graph's logits and cache."""
    batch = 2 if name == "gpt2" else 1
    ids = np.random.default_rng(4).integers(0, models[name].config.vocab_size, (batch, 9), dtype=np.int64)
    results = []
    for fused in (True, False):
        lm = CausalLM(_graph(exported[name, fused].onnx_path), threads=1)
        _, cache = lm.prefill(ids[:, :5], np.ones_like(ids[:, :5]))
        results.append(lm.step(ids[:, 5:], np.ones_like(ids), cache))
    (fused_logits, fused_cache), (plain_logits, plain_cache) = results
    assert np.abs(fused_logits - plain_logits).max() <= TOL
    assert fused_cache.length == plain_cache.length == ids.shape[1]
    assert all(np.abs(a[:, :, :ids.shape[1]] - b).max() <= TOL
               for a, b in zip(fused_cache.arrays, plain_cache.arrays, strict=True))


@pytest.mark.parametrize("name", ["gpt2", "llama", "kngpt2"])
def test_inputs_and_outputs_unchanged(exported, name):
    assert _io(exported[name, True].onnx_path) == _io(exported[name, False].onnx_path)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_one_fused_node_per_layer_and_fewer_attention_nodes(models, exported, name):
    config = models[name].config
    layers, fused, plain = config.num_hidden_layers, *(_nodes(exported[name, f].onnx_path) for f in (True, False))
    ops = Counter(n.op_type for n in fused)
    if name == "gpt2":
        assert ops["MultiHeadAttention"] == layers and ops["RotaryEmbedding"] == 0
    else:
        assert ops["GroupQueryAttention"] == layers and ops["RotaryEmbedding"] == 2 * layers
    assert not {"Softmax", "Transpose", "Neg"} & set(ops), "an attention core left unfused"
    attention = [sum(any(s in n.name for s in ATTENTION) and n.op_type not in ("MatMul", "Add", "Constant")
                     for n in graph) for graph in (fused, plain)]  # the projections' MatMul (+ bias Add) stay
    print(f"\n{name}: {len(fused)} nodes fused, {len(plain)} plain; attention nodes other than the projections "
          f"{attention[0]} fused, {attention[1]} plain")
    assert attention[0] < attention[1] and len(fused) < len(plain)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_fused_blocks_read_no_shapes(exported, name):
    """The lengths GroupQueryAttention needs and the mask are computed once per graph, outside the blocks."""
    nodes = _nodes(exported[name, True].onnx_path)
    assert not [n.name for n in nodes if n.op_type == "Shape" and ("/layers." in n.name or "/h." in n.name)]
    assert sum(n.op_type == "Where" for n in nodes) == 1


@pytest.mark.parametrize("name, fused, shared", [("llama", True, True), ("llama", False, False),
                                                 ("gpt2", True, False), ("gpt2", False, False)])
def test_only_group_query_attention_graphs_share_their_cache_buffer(exported, name, fused, shared):
    """kninfer.json says so exactly when every past tensor feeds one GroupQueryAttention node alone (GPT-2's
    MultiHeadAttention and the plain graphs' Concat copy the cache)."""
    bundle = _graph(exported[name, fused].onnx_path)
    assert bundle.kv_cache.shared_buffer is shared
    past = set(bundle.kv_cache.past_names())
    readers = Counter(n.op_type for n in _nodes(bundle.onnx_path) for i in n.input if i in past)
    assert (readers == Counter({"GroupQueryAttention": len(past)})) is shared


def _copying(bundle):
    """The same graph driven as if it could not share its cache: new present tensors every step."""
    return dataclasses.replace(bundle, kv_cache=dataclasses.replace(bundle.kv_cache, shared_buffer=False))


@pytest.mark.parametrize("capacity", [0, 32])
def test_shared_buffer_decoding_matches_the_copying_cache(models, exported, capacity):
    """Greedy steps on a left-padded batch with the cache written in place (from the prompt's own size, grown by
    doubling, or reserved up front) give the logits and cache of the same graph fed a new cache every step; the
    reserved buffer is the one every step writes into."""
    bundle = _graph(exported["llama", True].onnx_path)
    ids, mask = left_padded_batch(models["llama"].config.vocab_size, [6, 3], seed=5)
    runs = []
    for lm in (CausalLM(bundle, threads=1), CausalLM(_copying(bundle), threads=1)):
        step_mask = mask
        logits, cache = lm.prefill(ids, step_mask, capacity)
        first, steps = cache.arrays[0], [logits]
        for _ in range(12):
            step_mask = np.concatenate([step_mask, np.ones((2, 1), np.int64)], axis=1)
            logits, cache = lm.step(logits[:, -1:].argmax(-1), step_mask, cache)
            steps.append(logits)
        runs.append((steps, cache, first))
    (shared, shared_cache, first), (copied, copied_cache, _) = runs
    assert all(np.abs(a - b).max() <= 1e-6 for a, b in zip(shared, copied, strict=True))
    assert shared_cache.length == copied_cache.length == 18
    assert shared_cache.capacity == (32 if capacity else 24)  # 6 -> 12 -> 24 when grown
    assert (shared_cache.arrays[0] is first) is bool(capacity)
    assert all(np.abs(a[:, :, :18] - b).max() <= 1e-6
               for a, b in zip(shared_cache.arrays, copied_cache.arrays, strict=True))


def test_int8_keeps_the_fused_nodes(models, tmp_path):
    report = export_bundle(models["llama"], tmp_path / "int8.onnx", variant="int8", fused_attention=True)
    ops = Counter(n.op_type for n in _nodes(report.onnx_path))
    assert ops["GroupQueryAttention"] == models["llama"].config.num_hidden_layers and ops["MatMulNBits"]
    assert writes_cache_in_place(onnx.load(str(report.onnx_path), load_external_data=False),
                                 read_models(tmp_path)["int8.onnx"]["kv_cache"])
    assert report.agreement is not None and report.agreement > 0.5
    ids, mask = left_padded_batch(models["llama"].config.vocab_size, [6, 3])
    assert np.isfinite(CausalLM(_graph(report.onnx_path), threads=1).prefill(ids, mask)[0]).all()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_fused_classifier(family, tiny_config, tiny_llama_config, tmp_path):
    """Right-padded classification (no cache) on the fused graph."""
    from transformers import GPT2ForSequenceClassification, LlamaForSequenceClassification

    base, cls = ((tiny_config, GPT2ForSequenceClassification) if family == "gpt2"
                 else (tiny_llama_config, LlamaForSequenceClassification))
    torch.manual_seed(1)
    classifier = cls(base.__class__(**{**base.to_dict(), "num_labels": 2, "pad_token_id": 50256})).eval()
    report = export_bundle(classifier, tmp_path / "cls.onnx", task="sequence-classification", fused_attention=True)
    assert any(n.op_type in FUSED_OPS for n in _nodes(report.onnx_path))
    assert verify_classifier(classifier, _graph(report.onnx_path), lengths=[7, 4, 1]).max_abs_diff <= TOL
