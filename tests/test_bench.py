"""bench/latency.py end to end on two tiny bundles: JSON schema, figures recomputed from the same run, outputs."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kninfer.runtime.bundle import read_bundle

REPO = Path(__file__).resolve().parents[1]
LATENCY = REPO / "bench" / "latency.py"
PAST = [4, 16]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_teacher, gpt2_tokenizer) -> dict[str, Path]:
    """The tiny dense GPT-2 and its KnGPT2 --tie-head student, exported fp32."""
    from kninfer.export import export_bundle
    from kninfer.modeling.compress import compress

    root = tmp_path_factory.mktemp("bundles")
    tied, _ = compress(tiny_teacher, "kngpt2", tie_head=True)
    tokenizer = gpt2_tokenizer.backend_tokenizer.to_str()
    paths = {"gpt2": root / "gpt2" / "model.onnx", "kngpt2-tied": root / "kngpt2-tied" / "model.onnx"}
    for model, path in ((tiny_teacher, paths["gpt2"]), (tied.eval(), paths["kngpt2-tied"])):
        export_bundle(model, path, tokenizer_json=tokenizer, verify=False)
    return paths


@pytest.fixture(scope="module")
def run(tmp_path_factory, bundles, data_dir) -> tuple[dict, subprocess.CompletedProcess]:
    """One quick run with every column switched on, and its JSON."""
    out = tmp_path_factory.mktemp("results")
    text = data_dir / "moby-dick" / "moby-dick.txt"
    argv = ["--bundle", str(bundles["gpt2"]), "--bundle", str(bundles["kngpt2-tied"].parent), "--quick",
            "--prompt-lengths", "8", "32", "--past-lengths", *map(str, PAST), "--decode-steps", "4",
            "--memory", "--new-tokens", "8", "--text-file", str(text), "--text-tokens", "200", "--out-dir", str(out)]
    done = subprocess.run([sys.executable, str(LATENCY), *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (path,) = out.glob("latency-*.json")
    return json.loads(path.read_text()), done


def test_schema_and_settings(run):
    results, done = run
    assert results["schema"] == "kninfer-bench-latency" and results["schema_version"] == 1
    assert results["command"][1:3] == ["bench/latency.py", "--bundle"] and "--quick" in results["command"]
    assert {"cpu", "logical_cores", "threads", "platform"} <= set(results["machine"])
    assert results["versions"]["onnxruntime"] and results["versions"]["numpy"]
    assert results["settings"]["reference"] == "gpt2" and results["settings"]["past_lengths"] == PAST
    assert [m["name"] for m in results["models"]] == ["gpt2", "kngpt2-tied"]
    rounds = results["settings"]["rounds"]
    assert len(results["bandwidth"]["rounds"]) == rounds and results["bandwidth"]["median"] > 0.1
    for model in results["models"]:
        assert len(model["rounds"]) == rounds
        for r in model["rounds"]:
            assert set(r["prefill_ms"]) == {"8", "32"} and set(r["decode_ms"]) == {str(p) for p in PAST}
            assert all(len(d["steps"]) == 4 and d["p50"] <= d["p90"] for d in r["decode_ms"].values())
            assert r["load_s"] > 0 and r["peak_rss_bytes"] > r["baseline_rss_bytes"] > 0
        # a 1.7M-parameter bundle under numpy + onnxruntime needs ~100 MB; ru_maxrss would report the peak of
        # this pytest process (torch, transformers, the exports), inherited across fork + exec
        assert model["memory"]["new_tokens"] == 8 and 20e6 < model["memory"]["peak_rss_bytes"] < 400e6
        assert model["memory_low"]["new_tokens"] == 8 and 20e6 < model["memory_low"]["peak_rss_bytes"] < 400e6
        assert all(r["peak_rss_bytes"] < 400e6 for r in model["rounds"])
        assert model["perplexity"]["tokens"] > 100 and model["perplexity"]["perplexity"] > 1
        bundle = read_bundle(model["path"])
        assert model["parameters"] == bundle.meta["parameters"]
        assert model["file_bytes"] == sum(p.stat().st_size for p in (bundle.onnx_path, bundle.data_path))
    assert "| gpt2 | onnxruntime | fp32 |" in done.stdout


def test_ratios_and_floors_recomputed_from_the_same_rounds(run):
    """Speedup and measured/floor are the medians of per-round ratios of numbers stored in the same JSON."""
    results, _ = run
    ref, bandwidth = results["models"][0], [b["gb_s"] for b in results["bandwidth"]["rounds"]]
    for model in results["models"]:
        for past in map(str, PAST):
            mine = [r["decode_ms"][past]["p50"] for r in model["rounds"]]
            theirs = [r["decode_ms"][past]["p50"] for r in ref["rounds"]]
            speedup = [t / m for t, m in zip(theirs, mine, strict=True)]
            assert model["summary"]["speedup"][past]["median"] == pytest.approx(statistics.median(speedup), rel=1e-12)
            assert model["summary"]["decode_ms"][past]["p50"]["median"] == pytest.approx(statistics.median(mine))
            step = model["weight_bytes_per_step"] + 2 * 4 * 32 * int(past) * 4  # 4 layers, keys and values, d = 32
            floors = [step / (gb * 1e9) * 1e3 for gb in bandwidth]
            ratio = statistics.median(m / f for m, f in zip(mine, floors, strict=True))
            assert model["summary"]["measured_over_floor"][past]["median"] == pytest.approx(ratio, rel=1e-12)
    assert ref["summary"]["speedup"]["4"]["median"] == 1.0
    for target in results["targets"]:
        assert target["pass"] == (target["margin"] >= 0)
    tied = [t for t in results["targets"] if t["model"] == "kngpt2-tied" and "1.4x" in t["target"]]
    assert tied and tied[0]["measured"] == pytest.approx(results["models"][1]["summary"]["speedup"]["4"]["median"])


def test_weight_bytes_per_step_from_the_graph(run):
    """All initializer bytes, less the Gather-only position table (one row read): both token tables are also
    the tied head's weight (dense: Gemm with transB; Kronecker: Aᵀ in a MatMul), so they are read in full."""
    import onnx
    from onnx import numpy_helper

    results, _ = run
    for model in results["models"]:
        arrays = {t.name: numpy_helper.to_array(t) for t in onnx.load(model["path"]).graph.initializer}
        total = sum(a.nbytes for a in arrays.values())
        position = arrays["transformer.wpe.weight"]
        expected = total - (position.nbytes - position.nbytes // position.shape[0])
        assert model["weight_bytes"] == total
        assert model["weight_bytes_per_step"] == expected
    assert "transformer.wte.A_t" in {t.name for t in onnx.load(results["models"][1]["path"]).graph.initializer}


def test_markdown_and_plot_written(run):
    results, _ = run
    files = results["files"]
    table = Path(files["markdown"]).read_text()
    assert "| kngpt2-tied | onnxruntime | fp32 |" in table and "### Targets" in table
    assert " ".join(results["command"]) in table
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert files["plot"] is None
        return
    png = Path(files["plot"]).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    missing = tmp_path / "nothing" / "model.onnx"
    done = subprocess.run([sys.executable, str(LATENCY), "--bundle", str(missing), "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and str(missing) in done.stderr
    assert not list(tmp_path.glob("latency-*"))


def test_family_needs_the_zoo(tmp_path):
    done = subprocess.run([sys.executable, str(LATENCY), "--family", "llama", "--bundle", str(tmp_path),
                           "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--family llama chooses the zoo" in done.stderr
    assert done.stderr.strip().count("\n") == 0 and not list(tmp_path.glob("latency-*"))


def test_measure_bandwidth_reads_the_whole_array():
    """The bandwidth job reports bytes that match its array and a plausible rate (independent: the sizes)."""
    done = subprocess.run([sys.executable, str(REPO / "bench" / "measure.py"),
                           json.dumps({"job": "bandwidth", "threads": 2, "bytes": 2**24, "repeats": 2})],
                          capture_output=True, text=True, timeout=60)
    result = json.loads(done.stdout)
    assert result["bytes"] == 2**24
    probes = ("sum_1_thread", "sum_threads", "gemv", "max_bytes_threads")
    assert result["gb_s"] == max(result[f"{name}_gb_s"] for name in probes) == result[f"{result['probe']}_gb_s"]
    assert np.isfinite(result["gb_s"]) and result["gb_s"] > 0.1


# --- the zoo per family, and targets chosen by what a model is ------------------------------------------------------

ZOO_FIELDS = {"name", "path", "runtime", "family", "preset", "tie_head", "variant"}


def _tiny_gpt2():
    from transformers import GPT2Config

    return GPT2Config(vocab_size=50257, n_positions=128, n_embd=32, n_layer=4, n_head=4)


def _tiny_smollm2():
    """SmolLM2-135M's shape in miniature: GQA, head_dim set, tied embeddings, and a vocabulary smaller than GPT-2's
    tokenizer (which the zoo must then cut to fit)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                       rope_theta=1e5, tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0)


TINY_CONFIGS = {"gpt2": _tiny_gpt2, "llama": _tiny_smollm2}


@pytest.fixture(scope="module")
def bench_modules():
    """bench/zoo.py and bench/latency.py imported as latency.py imports zoo (bench/ on sys.path)."""
    if str(REPO / "bench") not in sys.path:
        sys.path.insert(0, str(REPO / "bench"))
    import latency
    import zoo

    return zoo, latency


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def tiny_zoo(request, bench_modules, tmp_path_factory, gpt2_tokenizer):
    """A family's zoo built on a tiny config: (ZooFamily, entries, zoo folder)."""
    import dataclasses

    zoo, _ = bench_modules
    family = dataclasses.replace(zoo.FAMILIES[request.param], config=TINY_CONFIGS[request.param])
    out = tmp_path_factory.mktemp(f"zoo-{request.param}")
    entries = zoo.build_zoo(out, gpt2_tokenizer.backend_tokenizer.to_str(), progress=lambda _: None, family=family)
    return family, entries, out


def _folder_bytes(path: str) -> int:
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def fake_measure(spec: dict, timeout: float) -> dict:
    """bench/measure.py's answers without running anything: decode time proportional to the model's bytes (1 ms per
    MB), as on a bandwidth-bound CPU; enough for the target selection, which is what these tests check."""
    if spec["job"] == "bandwidth":
        return {"gb_s": 10.0}
    size = _folder_bytes(spec["path"])
    ms = size / 1e6
    if spec["job"] == "latency":
        return {"load_s": 0.01, "prefill_ms": {str(n): ms * n for n in spec["prompt_lengths"]},
                "decode_ms": {str(p): {"p50": ms, "p90": ms, "steps": [ms]} for p in spec["past_lengths"]},
                "baseline_rss_bytes": 1, "peak_rss_bytes": size + 50_000_000}
    return {"peak_rss_bytes": size + 50_000_000, "new_tokens": spec["new_tokens"]}


def _run_in_process(latency, monkeypatch, tmp_path, data_dir, *argv: str) -> dict:
    monkeypatch.setattr(latency, "measure", fake_measure)
    argv = [*argv, "--quick", "--past-lengths", "4", "--prompt-lengths", "4", "--memory", "--new-tokens", "4",
            "--tokenizer", str(data_dir / "gpt2-tokenizer"), "--out-dir", str(tmp_path / "results")]
    return latency.run(latency.parse_args(argv), argv)


def test_zoo_families_are_described_alike_in_bench_and_kninfer(bench_modules):
    """latency.py reads bundles without torch, so it keeps the families' embedding and MLP paths itself."""
    from kninfer.modeling.families import FAMILIES

    zoo, latency = bench_modules
    assert latency.EMBEDDINGS == {name: family.embedding for name, family in FAMILIES.items()}
    assert latency.MLP_MAPS == {name: family.mlp for name, family in FAMILIES.items()}
    assert set(latency.ZOO_FAMILIES) == set(zoo.FAMILIES) and all(k == f.family for k, f in zoo.FAMILIES.items())
    from kninfer.export.bundle import QUANTIZED

    assert latency.QUANTIZED_VARIANTS == QUANTIZED and zoo.VARIANTS == ("fp32", *QUANTIZED)
    config = zoo.FAMILIES["llama"].config()
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers, config.num_key_value_heads,
            config.head_dim, config.tie_word_embeddings) == (49152, 576, 30, 3, 64, True)


# the quantized op types (and MatMulNBits' bits) each variant's graph holds
QUANTIZED_OPS = {"fp32": set(), "int8": {("MatMulNBits", 8)}, "int4": {("MatMulNBits", 4)},
                 "int8-dynamic": {("MatMulInteger", None)}}


def _quantized_ops(onnx_path) -> set[tuple[str, int | None]]:
    import onnx

    ops = set()
    for node in onnx.load(str(onnx_path), load_external_data=False).graph.node:
        if node.op_type == "MatMulNBits":
            ops.add((node.op_type, next(a.i for a in node.attribute if a.name == "bits")))
        elif node.op_type == "MatMulInteger":
            ops.add((node.op_type, None))
    return ops


def test_zoo_entries_say_what_each_model_is(tiny_zoo, bench_modules):
    """Same students in every family, named after it; each entry's kind is what its bundle's kninfer.json says
    (model_kind), except distil, which a bundle alone cannot tell from a dense model."""
    from tokenizers import Tokenizer

    family, entries, _ = tiny_zoo
    _, latency = bench_modules
    p, s = family.prefix, family.short
    variants = ("fp32", "int8", "int4", "int8-dynamic")
    assert [e["name"] for e in entries] == [
        *(f"{s}-{v}" for v in variants), f"optimum-{s}-fp32", f"optimum-{s}-int8-dynamic", f"torch-{s}",
        *(f"{p}kngpt2-{v}" for v in variants), f"torch-{p}kngpt2", *(f"{p}kngpt2-tied-{v}" for v in variants),
        *(f"{p}krony-pt-{v}" for v in variants), *(f"{p}distil-{v}" for v in variants)]
    assert family.reference == f"{s}-fp32"
    assert (s, p) == {"gpt2": ("gpt2", ""), "llama": ("smollm2", "smollm2-")}[family.family]  # GPT-2's names as before
    params = {}
    for entry in entries:
        assert set(entry) == ZOO_FIELDS and entry["family"] == family.family
        if entry["runtime"] == "torch":
            meta = json.loads((Path(entry["path"]) / "config.json").read_text())
        else:
            bundle = read_bundle(entry["path"])
            meta = bundle.meta
            assert meta["variant"] == entry["variant"]
            params[entry["name"]] = meta["parameters"]
            tokenizer = Tokenizer.from_file(str(bundle.tokenizer_path))
            assert tokenizer.get_vocab_size(with_added_tokens=True) <= bundle.vocab_size
            assert tokenizer.token_to_id("<|endoftext|>") == bundle.eos_token_id
            if not entry["name"].startswith("optimum-"):  # the graph is what its variant makes
                assert _quantized_ops(bundle.onnx_path) == QUANTIZED_OPS[entry["variant"]], entry["name"]
        expected = {k: entry[k] for k in ("family", "preset", "tie_head")}
        if entry["preset"] == "distil":
            expected["preset"] = None
        assert latency.model_kind(meta) == expected, entry["name"]
    # "kngpt2" keeps the paper's untied dense head although both teachers tie theirs (compress's default)
    assert params[f"{p}kngpt2-fp32"] > params[f"{p}kngpt2-tied-fp32"]


def test_zoo_run_selects_targets_by_kind(tiny_zoo, bench_modules, monkeypatch, tmp_path, data_dir):
    """--zoo --family: the reference is the family's dense fp32; the tied target picks only the tied kngpt2 student,
    the Kronecker targets every Kronecker student and neither distil nor a dense model; speed targets say when they
    were carried over from GPT-2 small."""
    family, entries, out = tiny_zoo
    zoo, latency = bench_modules
    monkeypatch.setitem(zoo.FAMILIES, family.family, family)
    results = _run_in_process(latency, monkeypatch, tmp_path, data_dir, "--zoo", "--family", family.family,
                              "--zoo-dir", str(out))
    p = family.prefix
    assert results["settings"]["reference"] == family.reference and results["settings"]["zoo"] == family.family
    assert [m["name"] for m in results["models"]] == [e["name"] for e in entries]
    rows = results["targets"]
    tied = {t["model"] for t in rows if "--tie-head" in t["target"]}
    assert tied == {f"{p}kngpt2-tied-fp32"}
    assert any("1.4x" in t["target"] for t in rows if t["model"] == f"{p}kngpt2-tied-fp32")
    kronecker = {f"{p}{name}-{v}" for name in ("kngpt2", "kngpt2-tied", "krony-pt") for v in zoo.VARIANTS}
    assert {t["model"] for t in rows if t["target"].startswith("peak RSS")} == kronecker
    ms = {m["name"]: m["summary"]["decode_ms"]["4"]["p50"]["median"] for m in results["models"]}
    quantized = ("-int8", "-int4", "-int8-dynamic")
    (best,) = [t for t in rows if "best quantized Kronecker >= 3x" in t["target"]]
    assert best["model"] in kronecker and best["model"].endswith(quantized)
    assert ms[best["model"]] == min(ms[name] for name in kronecker if name.endswith(quantized))
    (over_dense,) = [t for t in rows if "best quantized Kronecker >= 1.3x" in t["target"]]
    dense8 = [f"{family.short}-int8", f"{family.short}-int8-dynamic", f"optimum-{family.short}-int8-dynamic"]
    dense = over_dense["target"].split(" than ")[1].split(" [")[0]
    assert over_dense["model"] == best["model"] and dense in dense8 and ms[dense] == min(ms[n] for n in dense8)
    carried = family.family != "gpt2"
    speed = [t for t in rows if "faster than" in t["target"]]
    assert len(speed) == 3 and all(t["carried_over"] is carried for t in speed)
    assert all(("carried over from GPT-2 small" in t["target"]) is carried for t in speed)
    assert not any(t["carried_over"] for t in rows if t not in speed)
    assert ("apply them unchanged to the llama family" in results["markdown"]) is carried
    assert f"| {p}krony-pt-fp32 | onnxruntime | fp32 | {family.family} krony-pt |" in results["markdown"]


def test_zoo_remakes_an_int8_folder_of_dynamic_int8(tiny_zoo, bench_modules, gpt2_tokenizer):
    """An -int8 folder built before int8 meant block-wise says variant int8 but holds dynamic int8: the zoo remakes it
    (and only it); a folder of another variant than its name says is remade too."""
    import shutil

    family, entries, out = tiny_zoo
    zoo, _ = bench_modules
    s = family.short
    int8, dynamic, int4 = out / f"{s}-int8", out / f"{s}-int8-dynamic", out / f"{s}-int4"
    old = out / "old-int8"  # what the zoo wrote as X-int8 before: the dynamic graph, labelled int8
    shutil.copytree(dynamic, old)
    meta = json.loads((old / "kninfer.json").read_text())
    (entry,) = meta["models"].values()
    entry["variant"] = "int8"
    (old / "kninfer.json").write_text(json.dumps(meta))
    assert read_bundle(old).meta["variant"] == "int8" and _quantized_ops(read_bundle(old).onnx_path) == {
        ("MatMulInteger", None)}
    assert zoo._current(int8, "int8") and zoo._current(dynamic, "int8-dynamic") and zoo._current(int4, "int4")
    assert not zoo._current(old, "int8") and not zoo._current(dynamic, "int8")
    assert not zoo._current(out / "nothing-here", "int8") and not zoo._current(int8, "int4")

    shutil.rmtree(int8)
    old.rename(int8)
    said = []
    again = zoo.build_zoo(out, gpt2_tokenizer.backend_tokenizer.to_str(), progress=said.append, family=family)
    assert said == [f"quantizing {s} int8"]
    assert [e["name"] for e in again] == [e["name"] for e in entries]
    assert read_bundle(int8).meta["variant"] == "int8" and _quantized_ops(read_bundle(int8).onnx_path) == {
        ("MatMulNBits", 8)}


def test_quantized_targets_take_the_fastest_of_any_quantized_variant(bench_modules):
    """best quantized Kronecker: the fastest Kronecker model of a quantized variant (not a faster fp32 one, nor one
    of another family); compared with the fastest dense int8 or int8-dynamic model of the reference's depth (not a
    faster dense int4, nor a shallower dense model). Independent: hand-made rounds."""
    _, latency = bench_modules

    def model(name, ms_per_round, preset=None, variant="fp32", family="gpt2", layers=12):
        rounds = [{"decode_ms": {"32": {"p50": ms}}} for ms in ms_per_round]
        return {"name": name, "runtime": "onnxruntime", "preset": preset, "variant": variant, "tie_head": False,
                "family": family, "layers": layers, "weight_bytes": None, "rounds": rounds,
                "summary": {"decode_ms": {"32": {"p50": {"median": statistics.median(ms_per_round)}}},
                            "measured_over_floor": {}}}

    models = [model("dense-fp32", [90, 100, 110]),
              model("dense-int8", [50, 52, 54], variant="int8"),
              model("dense-int8-dynamic", [40, 42, 44], variant="int8-dynamic"),
              model("dense-int4", [20, 21, 22], variant="int4"),
              model("dense-6-int8", [10, 11, 12], variant="int8", layers=6),
              model("kron-fp32", [5, 5, 5], preset="krony-pt"),
              model("kron-int8", [30, 31, 32], preset="krony-pt", variant="int8"),
              model("kron-int4", [25, 30, 20], preset="kngpt2", variant="int4"),
              model("kron-int8-dynamic", [28, 29, 30], preset="kngpt2", variant="int8-dynamic"),
              model("llama-kron-int4", [1, 1, 1], preset="kngpt2", variant="int4", family="llama"),
              model("distil-int4", [2, 2, 2], preset="distil", variant="int4")]
    rows = {t["target"]: t for t in latency.targets(models, "dense-fp32", 32)}
    best = rows["best quantized Kronecker >= 3x faster than dense-fp32"]
    assert best["model"] == "kron-int4"
    assert best["measured"] == pytest.approx(statistics.median([90 / 25, 100 / 30, 110 / 20]))
    over = rows["best quantized Kronecker >= 1.3x faster than dense-int8-dynamic"]
    assert over["model"] == "kron-int4"
    assert over["measured"] == pytest.approx(statistics.median([40 / 25, 42 / 30, 44 / 20])) and over["pass"]
    assert not any("int8 Kronecker" in target for target in rows)


def test_a_krony_pt_student_is_not_taken_for_kngpt2(tiny_zoo, bench_modules, monkeypatch, tmp_path, data_dir):
    """A Krony-PT-shaped student (MLP maps only) compressed from a JSON spec on a tied teacher keeps the spec's
    tie_head true in kninfer.json (compress's tie_head follows the teacher), and its model_type is kngpt2 for a
    GPT-2: the old `model_type == "kngpt2" and tie_head` filter took it for "kngpt2 --tie-head". What it is decides."""
    import torch

    from kninfer.export import export_bundle
    from kninfer.modeling.compress import compress
    from kninfer.modeling.families import family_of

    family, entries, _ = tiny_zoo
    _, latency = bench_modules
    torch.manual_seed(0)
    config = family.config()
    teacher = family_of(config).causal_lm(config).eval()
    mlp = {"gpt2": "transformer.h.*.mlp.*", "llama": "model.layers.*.mlp.*"}[family.family]
    spec = tmp_path / "mlp-only.json"
    spec.write_text(json.dumps({"modules": {mlp: {"m2": 4, "n2": 4}}}))
    student, _ = compress(teacher, str(spec))
    by_name = {e["name"]: e for e in entries}
    tied = by_name[f"{family.prefix}kngpt2-tied-fp32"]["path"]
    bundle = tmp_path / "mlp-only" / "model.onnx"
    export_bundle(student.eval(), bundle, tokenizer_json=read_bundle(tied).tokenizer_path.read_text(), verify=False)
    meta = read_bundle(bundle).meta
    written = meta["kronecker"]  # as compress wrote it: tie_head true, the embedding dense
    assert written["tie_head"] is True and latency.EMBEDDINGS[family.family] not in written["modules"]
    assert latency.model_kind(meta) == {"family": family.family, "preset": "krony-pt", "tie_head": False}

    results = _run_in_process(latency, monkeypatch, tmp_path, data_dir,
                              "--bundle", by_name[f"{family.short}-fp32"]["path"], "--bundle", tied,
                              "--bundle", str(bundle))
    assert {t["model"] for t in results["targets"] if "--tie-head" in t["target"]} == {Path(tied).parent.name}
    kinds = {m["name"]: (m["preset"], m["tie_head"]) for m in results["models"]}
    assert kinds["mlp-only"] == ("krony-pt", False) and kinds[Path(tied).parent.name] == ("kngpt2", True)
    assert "mlp-only" in {t["model"] for t in results["targets"] if t["target"].startswith("peak RSS")}


def test_peer_targets_pair_rounds_and_compare_perplexity(bench_modules):
    """Against the peers: speed ratios paired round by round (independent: the medians of hand-made rounds) and
    perplexity compared with the rival's; the fastest Kronecker variant is the one chosen."""
    _, latency = bench_modules

    def model(name, runtime, ms_per_round, perplexity, preset=None, variant="fp32"):
        rounds = [{"decode_ms": {"32": {"p50": ms}}} for ms in ms_per_round]
        return {"name": name, "runtime": runtime, "preset": preset, "variant": variant, "tie_head": False,
                "weight_bytes": None,
                "family": "llama", "rounds": rounds, "perplexity": {"perplexity": perplexity},
                "summary": {"decode_ms": {"32": {"p50": {"median": statistics.median(ms_per_round)}}},
                            "measured_over_floor": {}}}

    models = [model("dense/fp32", "onnxruntime", [60, 70, 80], 18.0),
              model("dense/int4", "onnxruntime", [25, 26, 30], 25.0, variant="int4"),
              model("kron/int8", "onnxruntime", [20, 40, 21], 40.0, preset="odd-mlp", variant="int8"),
              model("kron/fp32", "onnxruntime", [30, 31, 32], 30.0, preset="odd-mlp"),
              model("llama.cpp/f32", "llama.cpp", [100, 70, 90], 18.1),
              model("llama.cpp/q8_0", "llama.cpp", [30, 50, 40], 18.3, variant="q8_0"),
              model("onnxruntime-genai/int4", "onnxruntime-genai", [24, 26, 28], 25.1, variant="int4")]
    rows = {(t["target"], t["model"]): t for t in latency.targets(models, "dense/fp32", 32)}
    faster = rows[("fastest Kronecker variant faster than llama.cpp/q8_0 (x)", "kron/int8")]
    assert faster["measured"] == pytest.approx(statistics.median([30 / 20, 50 / 40, 40 / 21])) and faster["pass"]
    worse = rows[("fastest Kronecker variant's perplexity no worse than llama.cpp/q8_0's", "kron/int8")]
    assert (worse["measured"], worse["threshold"], worse["pass"]) == (40.0, 18.3, False)
    genai = rows[("fastest Kronecker variant faster than onnxruntime-genai/int4 (x)", "kron/int8")]
    assert genai["measured"] == pytest.approx(statistics.median([24 / 20, 26 / 40, 28 / 21]))
    fp32 = rows[("dense fp32 within 1.2x of llama.cpp/f32 (ms/token ratio)", "dense/fp32")]
    assert fp32["measured"] == pytest.approx(1 / statistics.median([100 / 60, 70 / 70, 90 / 80])) and fp32["pass"]
    int4 = rows[("dense int4 within 1.2x of onnxruntime-genai/int4 (ms/token ratio)", "dense/int4")]
    assert int4["measured"] == pytest.approx(1 / statistics.median([24 / 25, 26 / 26, 28 / 30])) and int4["pass"]
