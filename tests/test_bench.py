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


def test_measure_bandwidth_reads_the_whole_array():
    """The bandwidth job reports bytes that match its array and a plausible rate (independent: the sizes)."""
    done = subprocess.run([sys.executable, str(REPO / "bench" / "measure.py"),
                           json.dumps({"job": "bandwidth", "threads": 2, "bytes": 2**24, "repeats": 2})],
                          capture_output=True, text=True, timeout=60)
    result = json.loads(done.stdout)
    assert result["bytes"] == 2**24
    assert result["gb_s"] == max(result["sum_1_thread_gb_s"], result["sum_threads_gb_s"], result["gemv_gb_s"])
    assert np.isfinite(result["gb_s"]) and result["gb_s"] > 0.1
