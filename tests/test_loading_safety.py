"""Loading a checkpoint: every bad input from the security issue is one clear line; good checkpoints load exactly."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import RepositoryNotFoundError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import kninfer.modeling.io as io
from kninfer.errors import KninferError
from kninfer.modeling.compress import compress
from kninfer.modeling.io import load, save

IDS = torch.tensor([[464, 2068, 7586, 21831, 18045, 625, 262, 16931], [40, 1101, 257, 1295, 13, 50256, 50256, 50256]])
FUZZ = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
WRONG_JSON = ["4", [4], {"a": 4}, True, 1.5, None]  # a field gets one whose JSON type differs from its own
HUGE = [10**9, 2**63, 10**30, -(10**9)]  # for integer fields
RANDOM_BYTES = bytes(range(256)) * 8
FC = "transformer.h.1.mlp.c_fc"  # a Kronecker module of the kngpt2 students


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def models(tiny_teacher) -> dict[str, torch.nn.Module]:
    """The originals: the dense teacher; KnGPT2 students with a dense head, a tied Kronecker head, and krony-pt's
    dense embedding tied to the head."""
    return {"teacher": tiny_teacher, "student": compress(tiny_teacher, "kngpt2")[0].eval(),
            "tied": compress(tiny_teacher, "kngpt2", tie_head=True)[0].eval(),
            "krony": compress(tiny_teacher, "krony-pt")[0].eval()}


@pytest.fixture(scope="module")
def expected(models) -> dict[str, torch.Tensor]:
    return {name: logits(model) for name, model in models.items()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory, models, gpt2_tokenizer) -> dict[str, Path]:
    """Each original with its tokenizer as a Hugging Face folder (`NAME`) and a `.pt` (`NAME.pt`)."""
    root = tmp_path_factory.mktemp("saved")
    return {name + suffix: save(model, root / (name + suffix), gpt2_tokenizer)
            for name, model in models.items() for suffix in ("", ".pt")}


def copy(checkpoint: Path, folder: Path) -> Path:
    """A fresh copy of a checkpoint to corrupt."""
    target = folder / checkpoint.name
    (shutil.copytree if checkpoint.is_dir() else shutil.copy)(checkpoint, target)
    return target


def refused(source: str | Path, *words: str) -> str:
    """The one-line KninferError that loading `source` raises, checked to hold `words`."""
    with pytest.raises(KninferError) as error:
        load(source)
    message = str(error.value)
    assert "\n" not in message and all(word in message for word in words), message
    return message


def edit_config(folder: Path, change: Callable[[dict[str, Any]], object]) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


def edit_payload(path: Path, change: Callable[[dict[str, Any]], object]) -> None:
    payload = torch.load(path, weights_only=True)
    change(payload)
    torch.save(payload, path)


def edit(change: Callable[[dict[str, Any]], object]) -> Callable[[Path], None]:
    """A corruption applying `change` to a folder's config.json, or to a .pt's whole payload."""
    return lambda path: edit_payload(path, change) if path.suffix == ".pt" else edit_config(path, change)


def drop_weight(path: Path) -> None:
    """Delete transformer.h.0.mlp.c_fc.weight from the checkpoint's weights."""
    key = "transformer.h.0.mlp.c_fc.weight"
    if path.suffix == ".pt":
        edit_payload(path, lambda payload: payload["state_dict"].pop(key))
        return
    weights = load_file(path / "model.safetensors")
    del weights[key]
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})


def pickle_weights(folder: Path) -> None:
    """Replace model.safetensors by a pickled pytorch_model.bin, as old hub checkpoints ship."""
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


def truncate(path: Path, fraction: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


@pytest.mark.parametrize("name", ["teacher", "teacher.pt"])
def test_a_missing_weight_is_named(tmp_path, saved, name):
    path = copy(saved[name], tmp_path)
    drop_weight(path)
    refused(path, "its weights do not match its config: 1 missing (transformer.h.0.mlp.c_fc.weight)")


@pytest.mark.parametrize("name", ["student", "student.pt", "tied", "tied.pt"])
def test_a_config_without_its_kronecker_spec_is_refused(tmp_path, saved, name):
    path = copy(saved[name], tmp_path)
    edit(lambda d: (d.get("config") or d).pop("kronecker"))(path)
    message = refused(path, "missing (transformer.", "unexpected (transformer.")
    assert re.search(r"\d+ unexpected \(transformer\.\S+\.(A|B|A_t)[,)]", message), message


@pytest.mark.parametrize("name", ["teacher", "teacher.pt", "student", "student.pt", "tied", "tied.pt", "krony",
                                  "krony.pt"])
def test_valid_checkpoints_reload_exactly(saved, expected, name):
    model, tokenizer = load(saved[name])
    assert torch.allclose(logits(model), expected[name.removesuffix(".pt")], atol=1e-6, rtol=0)
    assert tokenizer is not None
    if name in ("teacher", "krony", "tied"):  # the tied heads the loader must not call missing are absent indeed
        with safe_open(saved[name] / "model.safetensors", "pt") as weights:
            assert not any(key.startswith("lm_head.") for key in weights.keys())  # noqa: SIM118


def spec_entry(key: str, value: object) -> Callable[[dict[str, Any]], object]:
    """A change setting one factor of FC's entry in the config's (or a payload's config's) Kronecker spec."""
    return lambda d: (d.get("kronecker") or d["config"]["kronecker"])["modules"][FC].update({key: value})


BAD_CHECKPOINTS = [
    pytest.param("teacher", lambda p: (p / "config.json").write_text('{"n_layer": 4,'),
                 "config.json is not valid JSON", id="config-malformed"),
    pytest.param("teacher", lambda p: (p / "config.json").write_text(""), "config.json is not valid JSON",
                 id="config-empty"),
    pytest.param("teacher", lambda p: truncate(p / "model.safetensors", 0.5), "its weights file is corrupt",
                 id="safetensors-truncated"),
    pytest.param("teacher", lambda p: (p / "model.safetensors").write_bytes(RANDOM_BYTES),
                 "its weights file is corrupt", id="safetensors-garbage"),
    pytest.param("teacher", lambda p: (p / "model.safetensors").unlink(), "holds no weights", id="no-weights"),
    pytest.param("teacher", pickle_weights, "refused: unpickling could run code", id="pickled-weights"),
    pytest.param("teacher", edit(lambda c: c.update(auto_map={"AutoModelForCausalLM": "evil.Model"})),
                 "its config asks to run the checkpoint's own code (auto_map)", id="auto-map"),
    pytest.param("teacher", edit(lambda c: c.update(model_type="nopeformer")),
                 "transformers does not know model_type 'nopeformer'", id="unknown-model-type"),
    pytest.param("teacher", lambda p: (p / "tokenizer.json").write_text("garbage"),
                 "its tokenizer files are unreadable", id="tokenizer-garbage"),
    pytest.param("teacher", edit(lambda c: c.update(n_layer="4")), 'config field "n_layer" must be int, got \'4\'',
                 id="n_layer-string"),
    pytest.param("teacher", edit(lambda c: c.update(n_layer=10**9)),
                 "its config asks for 1,000,000,000 layers, but its weights hold only 52 tensors", id="n_layer-huge"),
    pytest.param("teacher", edit(lambda c: c.update(n_embd=10**7)), "52 of the wrong shape (transformer.",
                 id="n_embd-huge"),
    pytest.param("teacher", edit(lambda c: c.update(vocab_size=10**12)),
                 "1 of the wrong shape (transformer.wte.weight)", id="vocab-huge"),
    pytest.param("tied", edit(spec_entry("m1", -32)), f"kronecker spec '{FC}': m1 must be a positive integer, got -32",
                 id="spec-negative"),
    pytest.param("tied", edit(spec_entry("rank", 0)), "rank must be a positive integer, got 0", id="spec-rank-0"),
    pytest.param("tied", edit(spec_entry("rank", "2")), "rank must be a positive integer, got '2'",
                 id="spec-rank-string"),
    pytest.param("teacher.pt", edit(lambda p: p.pop("config")), 'not a complete kninfer checkpoint: no "config"',
                 id="pt-no-config"),
    pytest.param("teacher.pt", edit(lambda p: p.pop("state_dict")),
                 'not a complete kninfer checkpoint: no "state_dict"', id="pt-no-state-dict"),
    pytest.param("teacher.pt", edit(lambda p: p["config"].pop("model_type")), "the config has no model_type",
                 id="pt-no-model-type"),
    pytest.param("teacher.pt", edit(lambda p: p["config"].update(model_type="nopeformer")),
                 "transformers does not know model_type 'nopeformer'", id="pt-unknown-model-type"),
    pytest.param("teacher.pt", edit(lambda p: p.update(tokenizer={"tokenizer_json": "{", "special_tokens": "{}"})),
                 "its tokenizer is unreadable", id="pt-tokenizer-garbage"),
    pytest.param("teacher.pt", edit(lambda p: p["config"].update(n_embd=10**7)), "of the wrong shape",
                 id="pt-n_embd-huge"),
    pytest.param("teacher.pt", edit(lambda p: p["state_dict"].update({"extra.weight": torch.zeros(2)})),
                 "its weights do not match its config: 1 unexpected (extra.weight)", id="pt-extra-weight"),
    pytest.param("tied.pt", edit(spec_entry("rank", "2")), "rank must be a positive integer, got '2'",
                 id="pt-spec-rank-string"),
]


@pytest.mark.parametrize("name, corrupt, words", BAD_CHECKPOINTS)
def test_bad_checkpoints_are_one_line(tmp_path, saved, name, corrupt, words):
    path = copy(saved[name], tmp_path)
    corrupt(path)
    refused(path, f"'{path}'", words)


@pytest.mark.parametrize("entry, words", [
    ({"m2": -2, "n2": 1}, "m2 must be a positive integer, got -2"),
    ({"m2": 2, "n2": 1, "rank": 0}, "rank must be a positive integer, got 0"),
    ({"m2": 2, "n2": 1, "rank": "2"}, "rank must be a positive integer, got '2'"),
    ({"m2": 2, "n2": 1, "rank": 10**9}, "rank 1000000000 must be between 1 and 2"),
])
def test_bad_spec_files_are_refused(tmp_path, tiny_teacher, entry, words):
    spec = tmp_path / "my-spec.json"
    spec.write_text(json.dumps({"modules": {"transformer.h.*.mlp.c_fc": entry}}))
    with pytest.raises(KninferError, match=re.escape(f"'transformer.h.0.mlp.c_fc': {words}")):
        compress(tiny_teacher, str(spec))


@pytest.mark.parametrize("option, value", [("rank", 0), ("target_params", -5), ("target_params", 0)])
def test_bad_compress_options_are_refused(tiny_teacher, option, value):
    with pytest.raises(KninferError, match=f"^{option} must be a positive integer, got {value}$"):
        compress(tiny_teacher, "krony-pt", **{option: value})


@pytest.mark.parametrize("args", [["--rank", "0"], ["--target-params", "-5"], ["--target-params", "0"]])
def test_bad_compress_options_stop_the_cli_before_loading(tmp_path, monkeypatch, capsys, args):
    from kninfer.cli import main

    monkeypatch.setattr(sys, "argv", ["kninfer", "compress", "--teacher", "gpt2", "--out", str(tmp_path / "s.pt"),
                                      "--preset", "krony-pt", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and args[0] in lines[0], lines


def pickled_code(path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("this would run",))

    torch.save({"format": "kninfer", "config": {}, "state_dict": {}, "x": Evil()}, path)


@pytest.mark.parametrize("name, write, words", [
    ("random", lambda p: p.write_bytes(RANDOM_BYTES), "is not a kninfer checkpoint (.pt)"),
    ("random.pt", lambda p: p.write_bytes(RANDOM_BYTES), "is not a kninfer checkpoint (.pt)"),
    ("model.onnx", lambda p: p.write_bytes(b"\x08\x07\x12\x07pytorch"),
     "is an ONNX graph: pass a checkpoint, or use `kninfer generate` for bundles"),
    ("evil.pt", pickled_code, "is refused: it holds pickled objects beyond tensors and plain data, which could run"),
])
def test_only_pickled_code_is_called_code(tmp_path, name, write, words):
    path = tmp_path / name
    write(path)
    message = refused(path, f"'{path}' {words}")
    assert ("could run code" in message) == (name == "evil.pt")


@pytest.mark.parametrize("name", ["./nope", "nope.pt", "nope.onnx", "/no/such/folder", "a/b/c"])
def test_names_that_can_only_be_paths_fail_at_once(monkeypatch, name):
    monkeypatch.setattr(io, "model_info", lambda *args, **kwargs: pytest.fail("asked the hub"))
    refused(name, f"'{name}': no such file or directory")


def test_an_unreachable_hub_name_is_one_quiet_line(capfd):
    start = time.monotonic()
    refused("nope-model-xyz", "'nope-model-xyz'", "no such file or directory")
    assert time.monotonic() - start < 5
    assert capfd.readouterr() == ("", "")


def test_hub_names_are_asked_of_the_hub(monkeypatch):
    asked = []

    def model_info(name: str, timeout: float) -> None:
        asked.append(name)
        raise RepositoryNotFoundError("404")

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(io, "model_info", model_info)
    refused("someone/nope", "'someone/nope': no such file or directory, and no such model on the Hugging Face hub")
    assert asked == ["someone/nope"]


def test_hub_names_load_through_from_pretrained(tmp_path, monkeypatch, saved, expected):
    """Offline, a hub name loads from the hub cache, the way from_pretrained("gpt2") does."""
    import transformers.utils.hub

    snapshot = tmp_path / "models--someone--tiny-teacher" / "snapshots" / ("0" * 40)
    shutil.copytree(saved["teacher"], snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(transformers.utils.hub, "TRANSFORMERS_CACHE", str(tmp_path))
    model, tokenizer = load("someone/tiny-teacher")
    assert torch.allclose(logits(model), expected["teacher"], atol=1e-6, rtol=0) and tokenizer is not None


def test_cli_info_reports_bad_checkpoints_in_one_line(tmp_path, saved):
    garbage, graph, folder = tmp_path / "garbage", tmp_path / "model.onnx", copy(saved["teacher"], tmp_path)
    garbage.write_bytes(RANDOM_BYTES)
    graph.write_bytes(b"\x08\x07")
    drop_weight(folder)
    for path, words in [(garbage, "not a kninfer checkpoint (.pt)"), (graph, "is an ONNX graph"),
                        (folder, "1 missing (transformer.h.0.mlp.c_fc.weight)")]:
        run = subprocess.run([sys.executable, "-c", "from kninfer.cli import main; main()", "info", str(path)],
                             capture_output=True, text=True, timeout=300)
        lines = run.stderr.strip().splitlines()
        assert run.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], lines


def files_outside(root: Path, checkpoint: Path) -> list[Path]:
    """Every path under `root` but `checkpoint` and what it holds."""
    return sorted(path for path in root.rglob("*") if path != checkpoint and checkpoint not in path.parents)


def loads_exactly_or_refuses(checkpoint: Path, expected: torch.Tensor, root: Path) -> None:
    """Loading gives the original's logits or a one-line KninferError, and writes nothing beside the checkpoint."""
    before = files_outside(root, checkpoint)
    try:
        model, _ = load(checkpoint)
    except KninferError as error:
        assert "\n" not in str(error), str(error)
    else:
        assert torch.allclose(logits(model), expected, atol=1e-6, rtol=0)
    assert files_outside(root, checkpoint) == before


def change_field(data: st.DataObject, config: dict[str, Any]) -> None:
    """Give one field a value of another JSON type, or a huge or negative number if it is an integer."""
    key = data.draw(st.sampled_from(sorted(config)), label="field")
    original = config[key]
    values = [value for value in WRONG_JSON if type(value) is not type(original)]
    config[key] = data.draw(st.sampled_from(values + (HUGE if type(original) is int else [])), label="value")


def flip_bytes(data: st.DataObject, path: Path, end: int) -> None:
    """XOR a few bytes of `path` among its first `end`."""
    content = bytearray(path.read_bytes())
    for _ in range(data.draw(st.integers(1, 4), label="flips")):
        content[data.draw(st.integers(0, end - 1), label="offset")] ^= data.draw(st.integers(1, 255), label="xor")
    path.write_bytes(bytes(content))


def safetensors_header_end(path: Path) -> int:
    return 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


def corrupt_folder(data: st.DataObject, folder: Path) -> None:
    """One random corruption of a Hugging Face folder. Flips spare the weights' data and config.json: nothing can
    tell a flipped weight or digit from a real one, so they stay out (fields get wrong types or sizes instead)."""
    kind = data.draw(st.sampled_from(["truncate", "flip", "field", "delete", "add"]), label="kind")
    if kind == "field":
        edit_config(folder, lambda config: change_field(data, config))
        return
    if kind == "add":
        name = data.draw(st.sampled_from(["pytorch_model.bin", "model.safetensors.index.json", "added_tokens.json",
                                          "junk"]), label="added")
        (folder / name).write_bytes(data.draw(st.binary(max_size=64), label="content"))
        return
    names = sorted(path.name for path in folder.iterdir() if not (kind == "flip" and path.name == "config.json"))
    path = folder / data.draw(st.sampled_from(names), label="file")
    if kind == "delete":
        path.unlink()
    elif kind == "truncate":
        truncate(path, data.draw(st.floats(0, 1), label="fraction"))
    elif path.stat().st_size:
        end = safetensors_header_end(path) if path.name == "model.safetensors" else path.stat().st_size
        flip_bytes(data, path, end)


def corrupt_pt(data: st.DataObject, path: Path) -> None:
    """One random corruption of a .pt: the zip's checksums catch any flipped byte."""
    kind = data.draw(st.sampled_from(["truncate", "flip", "field", "entry"]), label="kind")
    if kind == "truncate":
        truncate(path, data.draw(st.floats(0, 1), label="fraction"))
    elif kind == "flip":
        flip_bytes(data, path, path.stat().st_size)
    elif kind == "field":
        edit_payload(path, lambda payload: change_field(data, payload["config"]))
    else:
        key = data.draw(st.sampled_from(["format", "config", "state_dict", "tokenizer", "extra"]), label="entry")
        edit_payload(path, lambda payload: payload.update({key: 1}) if key == "extra" else payload.pop(key))


@FUZZ
@given(data=st.data())
def test_fuzzed_folders_load_exactly_or_fail_in_one_line(tmp_path, saved, expected, data):
    with tempfile.TemporaryDirectory(dir=tmp_path) as work:
        folder = copy(saved["tied"], Path(work))
        corrupt_folder(data, folder)
        loads_exactly_or_refuses(folder, expected["tied"], tmp_path)
    assert not any(tmp_path.iterdir())


@FUZZ
@given(data=st.data())
def test_fuzzed_pt_files_load_exactly_or_fail_in_one_line(tmp_path, saved, expected, data):
    with tempfile.TemporaryDirectory(dir=tmp_path) as work:
        path = copy(saved["tied.pt"], Path(work))
        corrupt_pt(data, path)
        loads_exactly_or_refuses(path, expected["tied"], tmp_path)
    assert not any(tmp_path.iterdir())
