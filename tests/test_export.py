"""ONNX export: the graph keeps Kronecker layers factored, and onnxruntime matches PyTorch."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from kninfer.errors import KninferError
from kninfer.export import export_bundle, quantize_bundle
from kninfer.export.verify import verify_causal_lm, verify_classifier
from kninfer.kron import KroneckerEmbedding, KroneckerLinear
from kninfer.modeling.compress import compress
from kninfer.modeling.families import dense_weight
from kninfer.runtime.bundle import read_bundle
from kninfer.runtime.session import CausalLM

TOL = 1e-4  # fp32 onnxruntime vs PyTorch, max |Δlogits|


@pytest.fixture(scope="module")
def models(tiny_teacher):
    """The four model kinds the exporter serves, all from the same tiny teacher."""
    return {
        "kngpt2-tied": compress(tiny_teacher, "kngpt2", tie_head=True)[0].eval(),
        "kngpt2": compress(tiny_teacher, "kngpt2")[0].eval(),
        "krony-pt": compress(tiny_teacher, "krony-pt")[0].eval(),
        "gpt2": tiny_teacher,
    }


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory):
    """Each model exported once (fp32, no built-in verification: the tests verify)."""
    folder = tmp_path_factory.mktemp("onnx")
    return {name: export_bundle(m, folder / name / "model.onnx", verify=False).onnx_path for name, m in models.items()}


def _graph(path):
    """An exported graph (no tokenizer) as the runtime reads it."""
    return read_bundle(path, need_tokenizer=False)


def initializers(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def holding(inits: dict[str, np.ndarray], values: torch.Tensor) -> list[str]:
    """Initializers holding exactly these values in some arrangement (sorted values compared)."""
    want = np.sort(values.detach().numpy().ravel())
    return [k for k, v in inits.items() if v.size == want.size and np.allclose(np.sort(v.ravel()), want, atol=1e-7)]


def test_kronecker_layers_stay_factored(models, exported):
    model, path = models["kngpt2-tied"], exported["kngpt2-tied"]
    graph = onnx.load(str(path)).graph
    inits = initializers(path)
    matmul_weights = {n.input[1] for n in graph.node if n.op_type == "MatMul"}
    layers = [(p, m) for p, m in model.named_modules() if isinstance(m, KroneckerLinear)]
    assert len(layers) == 12  # 2 odd layers × (q, k, v, attn proj, fc, mlp proj)
    for path_, layer in layers:
        assert not holding(inits, dense_weight(model, path_)[0]), f"{path_}: dense weight in the graph"
        for factor in (layer.A, layer.B):
            names = holding(inits, factor)
            assert names and set(names) & matmul_weights, f"{path_}: factor is not a MatMul's right-hand input"
    print(f"\nkngpt2 --tie-head tiny graph: {len(graph.node)} nodes")


@pytest.fixture(scope="module")
def balanced(tiny_teacher, tmp_path_factory):
    """Custom specs with balanced factors (the general branch: neither n2 nor m2 is 1), rank 1 and 2, exported."""
    exports = {}
    for rank in (1, 2):
        folder = tmp_path_factory.mktemp(f"balanced-r{rank}")
        spec = {"modules": {"transformer.h.*.mlp.*": {"m1": 8, "n1": 4, "rank": rank},
                            "transformer.h.1.attn.c_proj": {"m2": 4, "n2": 8, "rank": rank}}}
        (folder / "spec.json").write_text(json.dumps(spec))
        model = compress(tiny_teacher, str(folder / "spec.json"))[0].eval()
        exports[rank] = model, export_bundle(model, folder / "model.onnx", verify=False).onnx_path
    return exports


@pytest.mark.parametrize("name", ["kngpt2-tied", "krony-pt", "balanced-r1"])
def test_no_4d_transpose_outside_attention(exported, balanced, name):
    path = balanced[1][1] if name == "balanced-r1" else exported[name]
    graph = onnx.load(str(path)).graph
    inferred = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in [*inferred.value_info, *inferred.input]}
    transposes = [n.name for n in graph.node if n.op_type == "Transpose" and ranks.get(n.input[0], 0) >= 4]
    kronecker_scopes = ("/c_attn/", "/c_proj/", "/mlp/", "/wte/", "lm_head")
    assert ranks and not [t for t in transposes if any(part in t for part in kronecker_scopes)]  # fused attention: none


@pytest.mark.parametrize("rank", [1, 2])
def test_balanced_factors_match_torch(balanced, rank):
    model, path = balanced[rank]
    assert sum(isinstance(m, KroneckerLinear) and m.rank == rank for m in model.modules()) == 9
    assert verify_causal_lm(model, _graph(path), lengths=[6, 3, 1]).max_abs_diff <= TOL
    report = quantize_bundle(path, path.parent / "int8" / "model.onnx")
    assert report.agreement > 0.5


def test_blocks_reshape_to_constant_targets(exported):
    """docs/architecture.md, "ONNX graph rules" (static reshapes): no size-based reshape (Shape node) inside any
    block; the mask is built once."""
    for name in ("kngpt2-tied", "gpt2"):
        graph = onnx.load(str(exported[name])).graph
        assert not [n.name for n in graph.node if n.op_type == "Shape" and "/h." in n.name], name
        assert sum(n.op_type == "Where" for n in graph.node) == 1, name


def test_dense_tied_head_reads_the_embedding(models, exported, tmp_path):
    """fp32: one table, read by the Gather and by the head's Gemm(transB=1); int8-dynamic: one int8 table Eᵀ, read by
    the head's MatMulInteger and (axis 1) by the Gather, no fp32 copy of E left."""
    model = models["gpt2"]
    vocab, d = model.config.vocab_size, model.config.n_embd
    (name,) = holding(initializers(exported["gpt2"]), model.transformer.wte.weight)
    users = [n for n in onnx.load(str(exported["gpt2"])).graph.node if name in n.input]
    assert sorted(n.op_type for n in users) == ["Gather", "Gemm"]
    report = export_bundle(model, tmp_path / "int8.onnx", variant="int8-dynamic", verify=False)
    assert report.agreement > 0.5
    graph = onnx.load(str(report.onnx_path)).graph
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    (head,) = [n.input[1] for n in graph.node if n.op_type == "MatMulInteger" and "lm_head" in n.name]
    assert shapes[head] == [d, vocab]
    assert [n.input[0] for n in graph.node if n.op_type == "Gather" and n.input[0] in shapes and
            shapes[n.input[0]] == [d, vocab]] == [head]
    floats = [v for v in initializers(report.onnx_path).values() if v.dtype == np.float32]
    assert all(v.size < vocab * d // 2 for v in floats), "an fp32 copy of the embedding is still stored"


def test_tied_factor_stored_once(models, exported):
    graph = onnx.load(str(exported["kngpt2-tied"])).graph
    embedding: KroneckerEmbedding = models["kngpt2-tied"].transformer.wte
    (name,) = holding(initializers(exported["kngpt2-tied"]), embedding.A_t)
    users = [n for n in graph.node if name in n.input]
    assert sorted(n.op_type for n in users) == ["Gather", "MatMul"]
    gather = next(n for n in users if n.op_type == "Gather")
    assert gather.attribute[0].i == 1 and next(n for n in users if n.op_type == "MatMul").input[1] == name
    vocab, d = embedding.num_embeddings, embedding.embedding_dim
    assert all(v.size < vocab * d for v in initializers(exported["kngpt2-tied"]).values())


def test_dense_variant_has_the_full_weights(models, tmp_path):
    model = models["kngpt2-tied"]
    path = export_bundle(model, tmp_path / "dense.onnx", variant="dense", verify=False).onnx_path
    inits = initializers(path)
    for layer in ("transformer.h.1.mlp.c_fc", "transformer.h.3.attn.c_proj", "transformer.wte"):
        assert holding(inits, dense_weight(model, layer)[0]), layer
    assert verify_causal_lm(model, _graph(path), lengths=[5, 2]).max_abs_diff <= TOL


@pytest.mark.parametrize("name", ["kngpt2-tied", "kngpt2", "krony-pt", "gpt2"])
@pytest.mark.parametrize("lengths", [[6], [6, 3, 1]], ids=["batch1", "batch3-left-padded"])
def test_onnxruntime_matches_torch(models, exported, name, lengths):
    result = verify_causal_lm(models[name], _graph(exported[name]), lengths=lengths, steps=3)
    assert result.max_abs_diff <= TOL


@pytest.mark.parametrize("pad", [50256, 0], ids=["pad-last", "pad-first"])  # GPT-2's EOS; our own BPE's is 0
def test_classification_graph(tiny_teacher, tmp_path, pad):
    from kninfer.modeling import KnGPT2Config, KnGPT2ForSequenceClassification

    student = compress(tiny_teacher, "kngpt2", tie_head=True)[0]
    config = KnGPT2Config(**{**student.config.to_dict(), "num_labels": 2, "pad_token_id": pad,
                             "architectures": ["KnGPT2ForSequenceClassification"]})
    torch.manual_seed(1)
    classifier = KnGPT2ForSequenceClassification(config).eval()
    report = export_bundle(classifier, tmp_path / "cls.onnx", task="sequence-classification", verify=False)
    assert verify_classifier(classifier, _graph(report.onnx_path), lengths=[7, 4, 1]).max_abs_diff <= TOL
    meta = json.loads((tmp_path / "kninfer.json").read_text())["models"]["cls.onnx"]
    assert meta["task"] == "sequence-classification" and meta["kv_cache"] is None and len(meta["labels"]) == 2


@pytest.fixture(scope="module")
def int8(models, tmp_path_factory):
    """kngpt2 --tie-head exported as int8-dynamic directly (every factor quantized, the tiny ones too)."""
    return export_bundle(models["kngpt2-tied"], tmp_path_factory.mktemp("int8") / "int8.onnx",
                         variant="int8-dynamic", verify=False)


def test_int8_reads_the_int8_table(models, int8):
    model, report = models["kngpt2-tied"], int8
    assert report.agreement > 0
    print(f"\nint8 top-1 agreement with fp32 (random tiny model, sample ids): {report.agreement:.1%}")
    vocab, d = model.config.vocab_size, model.config.n_embd
    floats = [v for v in initializers(report.onnx_path).values() if v.dtype == np.float32]
    assert all(v.size < vocab * d // 2 for v in floats), "the fp32 embedding factor is still stored"


def test_quantize_bundle_matches_export_int8(models, exported, int8, tmp_path):
    """Quantizing an exported fp32 bundle gives what `export --int8-dynamic` gives, without tracing again."""
    report = quantize_bundle(exported["kngpt2-tied"], tmp_path / "later" / "q.onnx", variant="int8-dynamic")
    meta = json.loads((tmp_path / "later" / "kninfer.json").read_text())["models"]["q.onnx"]
    fp32_meta = json.loads((exported["kngpt2-tied"].parent / "kninfer.json").read_text())["models"]["model.onnx"]
    files = ("onnx_data_file", "onnx_sha256")  # the graph's own files; the tokenizer (none here) is the same
    assert {k: v for k, v in meta.items() if k not in files} == {
        **{k: v for k, v in fp32_meta.items() if k not in files}, "variant": "int8-dynamic"}
    assert re.fullmatch(r"q\.onnx\.[0-9a-f]{8}\.data", meta["onnx_data_file"])
    assert report.agreement == int8.agreement
    ids = np.arange(0, models["kngpt2-tied"].config.vocab_size, 97, dtype=np.int64)[None, :20]
    logits = [CausalLM(_graph(p), threads=1).prefill(ids, np.ones_like(ids))[0]
              for p in (int8.onnx_path, report.onnx_path)]
    np.testing.assert_allclose(logits[0], logits[1], atol=1e-6)
    with pytest.raises(KninferError, match="quantize an fp32 one"):
        quantize_bundle(report.onnx_path, tmp_path / "again" / "q.onnx")


def test_bundle_files(models, tmp_path, gpt2_tokenizer):
    tokenizer_json = gpt2_tokenizer.backend_tokenizer.to_str()
    export_bundle(models["kngpt2"], tmp_path / "m.onnx", tokenizer_json=tokenizer_json, verify=False)
    meta = json.loads((tmp_path / "kninfer.json").read_text())
    assert meta["format"] == "kninfer-bundle" and meta["format_version"] == 2 and list(meta["models"]) == ["m.onnx"]
    entry = meta["models"]["m.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kninfer.json", "m.onnx", entry["onnx_data_file"],
                                                          "tokenizer.json"]
    assert re.fullmatch(r"m\.onnx\.[0-9a-f]{8}\.data", entry["onnx_data_file"])
    assert (tmp_path / "m.onnx").stat().st_size < 100_000, "the weights belong in the .data file"
    assert entry["model_type"] == "kngpt2" and entry["variant"] == "fp32"
    assert entry["tokenizer_file"] == "tokenizer.json"
    assert entry["kv_cache"]["num_layers"] == 4 and entry["kv_cache"]["head_dim"] == 8
    assert entry["onnx_sha256"] == hashlib.sha256((tmp_path / "m.onnx").read_bytes()).hexdigest()
    assert entry["tokenizer_sha256"] == hashlib.sha256(tokenizer_json.encode()).hexdigest()
    props = {p.key: json.loads(p.value) for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert props == {k: v for k, v in entry.items() if not k.endswith("_sha256")}


def test_failed_verification_writes_nothing(models, tmp_path, monkeypatch):
    monkeypatch.setattr("kninfer.export.verify.TOLERANCE", -1.0)
    with pytest.raises(KninferError, match="verification failed"):
        export_bundle(models["kngpt2"], tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_verification_bound_scales_with_the_logits_rms():
    from kninfer.export.verify import Verification

    assert Verification(5.9e-4, 3, logits_rms=13.8).ok  # SmolLM2-135M's real figures: 4.3e-5 of the RMS
    assert not Verification(5.9e-4, 3, logits_rms=0.5).ok  # below RMS 1 the bound stays 1e-4 absolute
    assert not Verification(2e-3, 3, logits_rms=13.8).ok


def test_cli_corrupt_checkpoint_exits_2(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-c", "from kninfer.cli import main; main()", "export",
                             str(tmp_path / "bad.pt"), str(out / "m.onnx")], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and "bad.pt" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize("case", ["no-config", "unknown-task"])
def test_cli_bad_input_writes_nothing(case, tmp_path, tiny_teacher_dir):
    """The command raises KninferError (the CLI's exit 2, checked above) before writing anything."""
    from kninfer.cli.export import export

    (tmp_path / "empty").mkdir()
    source, task, message = {"no-config": (tmp_path / "empty", "causal-lm", "without config.json"),
                             "unknown-task": (tiny_teacher_dir, "translation", "unknown task")}[case]
    with pytest.raises(KninferError, match=message):
        export(str(source), tmp_path / "out" / "m.onnx", task=task, opset=18, dense=False, int8=False,
               verify=True, tokenizer=None)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
