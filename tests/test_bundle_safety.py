"""Bundle safety: an export changes a folder whole or is refused at load, several graphs share a folder, file modes,
vocabularies, kninfer.json validated field by field, nothing read outside the folder, and a fuzz of the loader."""

from __future__ import annotations

import copy
import json
import os
import shutil
import stat
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_runtime import _cli, _edit_entry

import kninfer
from kninfer.errors import KninferError
from kninfer.export.bundle import export_bundle, quantize_bundle
from kninfer.runtime.bundle import FIELDS, KV_KEYS, external_data_locations, file_sha256, read_bundle
from kninfer.runtime.session import CausalLM, Classifier

IDS = np.array([[5, 17, 300, 2, 9000, 50256]], np.int64)
TOL = 1e-4  # fp32 onnxruntime vs PyTorch, max |Δlogits|: the exporter's own verification bound
INT8_TOL = 0.02  # int8 vs PyTorch on this model (|logits| <= 0.5): the quantization error, 0.006 measured
MODEL = ("models", "model.onnx")  # the path of the one graph's entry in kninfer.json


def _run(path: Path) -> np.ndarray:
    """The loader end to end, in this process: kninfer.load (bundle, tokenizer, session), then a prefill of IDS."""
    return kninfer.load(path, threads=1).session.prefill(IDS, np.ones_like(IDS))[0]


def _torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(IDS)).logits.numpy()


def _one_line_error(call) -> str:
    """The KninferError `call` raises, checked to be one line."""
    with pytest.raises(KninferError) as info:
        call()
    message = str(info.value)
    assert message and len(message.splitlines()) == 1, message
    return message


def _entry(folder: Path, name: str = "model.onnx") -> dict:
    return json.loads((folder / "kninfer.json").read_text())["models"][name]


def _set_field(folder: Path, path: tuple[str, ...], value) -> None:
    """Set kninfer.json's field at `path` (keys from the top), when the file is JSON and the path's parents exist."""
    try:
        meta = json.loads((folder / "kninfer.json").read_text())
        target = meta
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    except (OSError, ValueError, KeyError, TypeError):
        return
    (folder / "kninfer.json").write_text(json.dumps(meta))


def _respaced(tokenizer_json: str) -> str:
    """The same tokenizer in other bytes: an export writes it as a different file."""
    return json.dumps(json.loads(tokenizer_json), indent=1)


@pytest.fixture(scope="module")
def tokenizer_json(gpt2_tokenizer) -> str:
    return gpt2_tokenizer.backend_tokenizer.to_str()


@pytest.fixture(scope="module")
def other_teacher(tiny_config):
    """A second tiny GPT-2, other weights: its logits tell which graph ran."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(1)
    return GPT2LMHeadModel(tiny_config).eval()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_teacher, export_tiny) -> Path:
    return export_tiny(tiny_teacher, tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def baseline(bundle, tiny_teacher) -> np.ndarray:
    logits = _run(bundle)
    np.testing.assert_allclose(logits, _torch_logits(tiny_teacher), atol=TOL)
    return logits


@pytest.fixture
def folder(bundle, tmp_path) -> Path:
    """A copy of the tiny bundle to break."""
    return Path(shutil.copytree(bundle, tmp_path / "bundle"))


@pytest.mark.parametrize("dies_at", ["weights", "tokenizer", "graph", "kninfer.json"])
def test_a_killed_export_leaves_the_old_bundle_or_a_refusal(dies_at, tmp_path, tiny_teacher, other_teacher,
                                                             tokenizer_json, monkeypatch):
    """A second export into the folder dies at one rename: the folder then runs the first model (= PyTorch within
    1e-4) or refuses as inconsistent in one line; never the new graph with old files or the reverse."""
    export_bundle(tiny_teacher, tmp_path / "model.onnx", tokenizer_json=tokenizer_json, verify=False)
    replace = os.replace

    def dying(source, target) -> None:
        name = Path(target).name
        if {"weights": name.endswith(".data"), "tokenizer": name == "tokenizer.json", "graph": name == "model.onnx",
                "kninfer.json": name == "kninfer.json"}[dies_at]:
            raise OSError(5, "Input/output error")
        replace(source, target)

    monkeypatch.setattr(os, "replace", dying)
    with pytest.raises(KninferError, match="cannot write"):
        export_bundle(other_teacher, tmp_path / "model.onnx", tokenizer_json=_respaced(tokenizer_json), verify=False)
    monkeypatch.undo()
    try:
        logits = _run(tmp_path)
    except KninferError as error:
        assert "inconsistent" in str(error) and len(str(error).splitlines()) == 1
    else:
        np.testing.assert_allclose(logits, _torch_logits(tiny_teacher), atol=TOL)


def test_the_next_export_clears_what_a_killed_one_left(tmp_path, tiny_teacher, other_teacher, tokenizer_json):
    """Staging folders and weights of killed exports of NAME go with the next export of NAME, as do the replaced
    weights; files kninfer did not write stay."""
    export_bundle(tiny_teacher, tmp_path / "model.onnx", tokenizer_json=tokenizer_json, verify=False)
    staging = Path(tempfile.mkdtemp(prefix=".model.onnx.", dir=tmp_path))  # what _staging makes, left by a kill
    (staging / "model.onnx").write_bytes(b"half a graph")
    (tmp_path / "model.onnx.0123abcd.data").write_bytes(b"weights renamed in before the kill")
    foreign = ["notes.txt", "model.onnx.data.bak", ".other.onnx.abcdefgh"]
    for name in foreign:
        (tmp_path / name).write_text("not kninfer's")
    export_bundle(other_teacher, tmp_path / "model.onnx", tokenizer_json=tokenizer_json, verify=False)
    np.testing.assert_allclose(_run(tmp_path), _torch_logits(other_teacher), atol=TOL)
    assert {p.name for p in tmp_path.iterdir()} == {"kninfer.json", "model.onnx", "tokenizer.json",
                                                    _entry(tmp_path)["onnx_data_file"], *foreign}


def test_two_graphs_share_a_folder(tmp_path, tiny_teacher, tokenizer_json):
    """`export out.onnx`, then `export out-int8.onnx --int8` beside it: both run (fp32 = PyTorch within 1e-4, int8
    within 0.02 and equal to quantize_bundle's int8 from this folder), the folder alone asks which, one tokenizer."""
    for name, variant in (("out.onnx", "fp32"), ("out-int8.onnx", "int8")):
        export_bundle(tiny_teacher, tmp_path / name, variant=variant, tokenizer_json=tokenizer_json, verify=False)
    quantize_bundle(tmp_path / "out.onnx", tmp_path / "q.onnx")
    want = _torch_logits(tiny_teacher)
    np.testing.assert_allclose(_run(tmp_path / "out.onnx"), want, atol=TOL)
    int8 = _run(tmp_path / "out-int8.onnx")
    np.testing.assert_allclose(int8, want, atol=INT8_TOL)
    np.testing.assert_allclose(_run(tmp_path / "q.onnx"), int8, atol=1e-6)
    message = _one_line_error(lambda: read_bundle(tmp_path))
    listed = ", ".join(str(tmp_path / name) for name in ("out.onnx", "out-int8.onnx", "q.onnx"))
    assert message.endswith(f"pass one of: {listed}")
    assert [p.name for p in tmp_path.glob("*tokenizer*")] == ["tokenizer.json"]

    export_bundle(tiny_teacher, tmp_path / "third.onnx", tokenizer_json=_respaced(tokenizer_json), verify=False)
    assert _entry(tmp_path, "third.onnx")["tokenizer_file"] == "third.tokenizer.json"
    assert {_entry(tmp_path, name)["tokenizer_file"] for name in ("out.onnx", "out-int8.onnx")} == {"tokenizer.json"}
    for name in ("out.onnx", "third.onnx"):
        np.testing.assert_allclose(_run(tmp_path / name), want, atol=TOL)


def test_a_version_1_folder_still_loads_and_takes_more_graphs(folder, tiny_teacher, tokenizer_json):
    entry = {k: v for k, v in _entry(folder).items() if k not in ("tokenizer_file", "onnx_sha256", "tokenizer_sha256")}
    (folder / "kninfer.json").write_text(json.dumps({"format": "kninfer-bundle", "format_version": 1,
                                                     "onnx_file": "model.onnx", **entry}))
    want = _torch_logits(tiny_teacher)
    np.testing.assert_allclose(_run(folder), want, atol=TOL)
    export_bundle(tiny_teacher, folder / "b.onnx", tokenizer_json=tokenizer_json, verify=False)
    assert sorted(json.loads((folder / "kninfer.json").read_text())["models"]) == ["b.onnx", "model.onnx"]
    for name in ("model.onnx", "b.onnx"):
        np.testing.assert_allclose(_run(folder / name), want, atol=TOL)


def test_files_kninfer_did_not_write_are_not_replaced(tmp_path, tiny_teacher, tokenizer_json):
    (tmp_path / "mine.onnx").write_bytes(b"a graph of the user's")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "kninfer.json").write_text('{"hello": 1}')
    message = _one_line_error(lambda: export_bundle(tiny_teacher, tmp_path / "mine.onnx", verify=False))
    assert "refusing to replace a file kninfer did not write" in message
    message = _one_line_error(lambda: export_bundle(tiny_teacher, tmp_path / "other" / "m.onnx", verify=False))
    assert "not a kninfer bundle description; refusing to replace it" in message
    assert (tmp_path / "mine.onnx").read_bytes() == b"a graph of the user's"
    assert (tmp_path / "other" / "kninfer.json").read_text() == '{"hello": 1}'
    export_bundle(tiny_teacher, tmp_path / "mine.onnx", tokenizer_json=tokenizer_json, verify=False, overwrite=True)
    np.testing.assert_allclose(_run(tmp_path), _torch_logits(tiny_teacher), atol=TOL)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_bundle_files_get_the_modes_of_a_plain_open(umask, tmp_path, tiny_teacher, tokenizer_json):
    previous = os.umask(umask)
    try:
        export_bundle(tiny_teacher, tmp_path / "b" / "model.onnx", tokenizer_json=tokenizer_json, verify=False)
        (tmp_path / "plain").write_text("written by open()")
    finally:
        os.umask(previous)
    plain = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "b").iterdir()}
    assert len(modes) == 4 and modes == dict.fromkeys(modes, plain)


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path, folder, tiny_teacher, tokenizer_json):
    from tokenizers import Tokenizer

    bigger = Tokenizer.from_str(tokenizer_json)
    bigger.add_tokens(["<an-extra-token>"])
    out = tmp_path / "new" / "m.onnx"
    message = _one_line_error(lambda: export_bundle(tiny_teacher, out, tokenizer_json=bigger.to_str(), verify=False))
    assert "50258 tokens" in message and not out.parent.exists()
    (folder / "tokenizer.json").write_text(bigger.to_str())
    _edit_entry(folder, tokenizer_sha256=file_sha256(folder / "tokenizer.json"))  # consistent, but too big
    assert "50258 tokens" in _one_line_error(lambda: _run(folder))


KV = MODEL + ("kv_cache",)
BAD_FIELDS = [  # (path in kninfer.json, value, text of the one-line error)
    (KV + ("num_layers",), "4", "\"num_layers\" is '4', expected an integer"),
    (KV + ("num_layers",), 10**9, "kv_cache.num_layers 1000000000 needs 2000000003"),
    (KV + ("num_layers",), 1e9, "expected an integer"),
    (KV + ("num_layers",), True, "expected an integer"),
    (KV + ("num_heads",), 2, "does not match its kninfer.json"),
    (KV + ("head_dim",), 16, "does not match its kninfer.json"),
    (KV + ("past_key",), "past_key_values.{i.__class__}.key", "expected a name with one {i}"),
    (KV, "yes", "expected null or an object"),
    (MODEL + ("context_length",), 0, "expected 1 or more"),
    (MODEL + ("context_length",), "128", "expected an integer"),
    (MODEL + ("pad_token_id",), 50257, "outside the vocabulary"),
    (MODEL + ("eos_token_id",), -1, "outside the vocabulary"),
    (MODEL + ("eos_token_id",), False, "expected an integer"),
    (MODEL + ("bos_token_id",), 1.5, "expected null or an integer"),
    (MODEL + ("vocab_size",), 60000, "logits has size 50257 on axis -1, kninfer.json implies 60000"),
    (MODEL + ("labels",), 5, "expected null or a list"),
    (MODEL + ("labels",), [1, 2], "expected a list of strings"),
    (MODEL + ("task",), 7, "expected a string"),
    (MODEL + ("task",), "translation", "is not one of"),
    (MODEL + ("onnx_data_file",), 5, "expected null or a string"),
    (MODEL + ("onnx_data_file",), "../outside.data", "outside the bundle folder"),
    (MODEL + ("onnx_data_file",), "/etc/passwd", "outside the bundle folder"),
    (MODEL + ("tokenizer_file",), "../tokenizer.json", "outside the bundle folder"),
    (MODEL + ("kronecker",), [1], "expected null or an object"),
    (MODEL + ("max_input_length",), 0, "expected 1 or more"),
    (("format_version",), True, "format_version True"),
    (("format_version",), "2", "format_version '2'"),
    (("models",), [], "expected an object of graph entries"),
    (("models",), {"../model.onnx": {}}, "is not a file name in the bundle folder"),
]


@pytest.mark.parametrize("path,value,expected", BAD_FIELDS, ids=lambda v: str(v)[:24] if isinstance(v, str) else None)
def test_bad_kninfer_json_fields_are_one_line_errors(path, value, expected, folder):
    """Wrong types, bools for ints, values past the graph: one line before anything big is built (the Python heap
    stays under 50 MB while 10**9 layers are refused)."""
    _set_field(folder, path, value)
    tracemalloc.start()
    try:
        message = _one_line_error(lambda: _run(folder))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert expected in message and peak < 50e6


def test_cli_refuses_a_bad_field_in_one_line(folder):
    _edit_entry(folder, kv_cache={**_entry(folder)["kv_cache"], "num_layers": "4"})
    done = _cli("generate", str(folder), "--prompt", "Hello")
    assert done.returncode == 2 and done.stdout == "" and done.stderr.count("\n") == 1
    assert done.stderr.startswith("error: ") and "expected an integer" in done.stderr


def test_a_context_past_the_graph_fails_in_one_line(folder, capfd):
    """kninfer.json promising more positions than the graph has: onnxruntime's failure is one line naming the
    bundle, and onnxruntime logs nothing besides."""
    _edit_entry(folder, context_length=100_000)
    model = CausalLM(read_bundle(folder), threads=1)
    ids = np.full((1, 201), 5, np.int64)  # positions up to 200, past the graph's 128
    message = _one_line_error(lambda: model.prefill(ids, np.ones_like(ids)))
    assert message.startswith(f"onnxruntime failed to run '{folder / 'model.onnx'}'")
    assert capfd.readouterr().err == ""


def test_classifier_labels_must_fit_its_logits(tmp_path, tiny_config, export_tiny):
    from transformers import GPT2ForSequenceClassification

    config = copy.deepcopy(tiny_config)
    config.num_labels, config.pad_token_id = 2, 50256
    torch.manual_seed(2)
    folder = export_tiny(GPT2ForSequenceClassification(config).eval(), tmp_path, task="sequence-classification")
    _edit_entry(folder, labels=["only one"])
    assert "logits has size 2 on axis -1" in _one_line_error(lambda: Classifier(read_bundle(folder), threads=1))


def _relocate(folder: Path, location: str) -> None:
    """Point the graph's external data at `location`, the new graph's sha256 recorded: consistent, but hostile."""
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    for tensor in graph.graph.initializer:
        for item in tensor.external_data:
            if item.key == "location":
                item.value = location
    onnx.save(graph, str(folder / "model.onnx"))
    _edit_entry(folder, onnx_sha256=file_sha256(folder / "model.onnx"))


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink"])
def test_external_data_outside_the_folder_is_refused_before_onnxruntime(where, folder, tmp_path, monkeypatch):
    """The graph reads its weights from a file out of the folder (the real weights: onnxruntime 1.18 ran them)."""
    outside = tmp_path / "outside.data"
    shutil.copy(folder / _entry(folder)["onnx_data_file"], outside)
    (folder / "inside.data").symlink_to(outside)
    _relocate(folder, {"parent": "../outside.data", "absolute": str(outside), "symlink": "inside.data"}[where])
    monkeypatch.setattr("kninfer.runtime.session.ort.InferenceSession",
                        lambda *_, **__: pytest.fail("onnxruntime opened it"))
    assert "outside the bundle folder" in _one_line_error(lambda: _run(folder))


def _protobuf_field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field: tag and length as varints."""
    def varint(value: int) -> bytes:
        out = b""
        while value >= 0x80:
            out, value = out + bytes([value & 0x7F | 0x80]), value >> 7
        return out + bytes([value])

    return varint(number << 3 | 2) + varint(len(payload)) + payload


def test_external_data_locations_agree_with_onnx(bundle, tmp_path):
    """The loader's protobuf reading finds what onnx finds, also in an entry written value first (valid protobuf
    that a byte search for key-then-value misses)."""
    graph = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    expected = {item.value for t in graph.graph.initializer for item in t.external_data if item.key == "location"}
    assert external_data_locations(bundle / "model.onnx") == expected == {_entry(bundle)["onnx_data_file"]}

    tensor = onnx.TensorProto(name="w", data_type=onnx.TensorProto.FLOAT, dims=[1],
                              data_location=onnx.TensorProto.EXTERNAL).SerializeToString()
    value_first = _protobuf_field(2, b"../x.data") + _protobuf_field(1, b"location")
    model = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [])).SerializeToString()
    model += _protobuf_field(7, _protobuf_field(5, tensor + _protobuf_field(13, value_first)))  # graph.initializer
    parsed = onnx.load_model_from_string(model).graph.initializer[-1].external_data
    assert [(item.key, item.value) for item in parsed] == [("location", "../x.data")]
    (tmp_path / "crafted.onnx").write_bytes(model)
    assert external_data_locations(tmp_path / "crafted.onnx") == {"../x.data"}


@pytest.mark.parametrize("case", ["truncated graph", "truncated graph, recorded", "garbage weights",
                                  "garbage tokenizer, recorded"])
def test_broken_files_are_one_line_errors(case, folder):
    graph, tokenizer = folder / "model.onnx", folder / "tokenizer.json"
    if case.startswith("truncated graph"):
        graph.write_bytes(graph.read_bytes()[:1000])
    if case == "garbage weights":
        (folder / _entry(folder)["onnx_data_file"]).write_bytes(b"garbage")
    if case.startswith("garbage tokenizer"):
        tokenizer.write_text("{not json")
    if case.endswith("recorded"):  # the sha256 updated: the file's own check must speak
        _edit_entry(folder, onnx_sha256=file_sha256(graph), tokenizer_sha256=file_sha256(tokenizer))
    expected = {"truncated graph": "the bundle is inconsistent (an export was interrupted or a file was replaced)",
                "truncated graph, recorded": "is not a loadable ONNX model",
                "garbage weights": "is not a loadable ONNX model",
                "garbage tokenizer, recorded": "is not a readable tokenizer.json"}[case]
    assert expected in _one_line_error(lambda: _run(folder))


FILES = ("kninfer.json", "tokenizer.json", "model.onnx", "weights")
FIELD_PATHS = [("format",), ("format_version",), ("models",), *(MODEL + (key,) for key in [*FIELDS, "surplus"]),
               *(KV + (key,) for key in KV_KEYS)]
JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                        st.text(max_size=12), st.lists(st.integers(), max_size=3),
                        st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
FRACTION = st.floats(0, 1, exclude_max=True)
CORRUPTIONS = st.one_of(
    st.tuples(st.just("truncate"), st.sampled_from(FILES), FRACTION),
    st.tuples(st.just("flip"), st.sampled_from(FILES[:3]),
              st.lists(st.tuples(FRACTION, st.integers(1, 255)), min_size=1, max_size=4)),
    st.tuples(st.just("field"), st.sampled_from(FIELD_PATHS), JSON_VALUES),
    st.tuples(st.just("delete"), st.sampled_from(FILES)),
    st.tuples(st.just("add"), st.sampled_from(["extra.bin", "model.onnx.0123abcd.data", "model.tokenizer.json"]),
              st.binary(max_size=64)),
)


def _corrupt(folder: Path, weights: str, corruption: tuple) -> None:
    kind, target, *how = corruption
    if kind == "field":
        _set_field(folder, target, how[0])
        return
    path = folder / (weights if target == "weights" else target)
    if kind == "add":
        path.write_bytes(how[0])
    elif not path.is_file():
        return
    elif kind == "delete":
        path.unlink()
    elif kind == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[:int(how[0] * len(data))])
    else:
        data = bytearray(path.read_bytes())
        for where, mask in how[0]:
            data[int(where * len(data))] ^= mask
        path.write_bytes(bytes(data))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(corruptions=st.lists(CORRUPTIONS, min_size=1, max_size=3))
def test_fuzzed_bundles_load_the_same_or_fail_in_one_line(corruptions, bundle, baseline):
    """Random damage to a real bundle: it loads and gives the same logits (harmless damage) or raises KninferError
    in one line; never another exception, never a file written outside the folder."""
    weights = _entry(bundle)["onnx_data_file"]
    with tempfile.TemporaryDirectory() as root:
        folder = Path(shutil.copytree(bundle, Path(root) / "bundle"))
        for corruption in corruptions:
            _corrupt(folder, weights, corruption)
        try:
            logits = _run(folder)
        except KninferError as error:
            assert str(error) and len(str(error).splitlines()) == 1, str(error)
        else:
            np.testing.assert_allclose(logits, baseline, atol=1e-6)
        assert os.listdir(root) == ["bundle"]
