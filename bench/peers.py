"""Peer engines for `bench/latency.py --peers`: llama.cpp (llama-cpp-python) and onnxruntime-genai, run on the
same dense weights, token ids and protocol as kninfer's bundles.

    pip install 'kninfer[peers]'      # llama-cpp-python built from source, see pyproject.toml's `peers` extra
    python bench/peers.py prepare DENSE_DIR --builder-python /tmp/peers/genai-venv/bin/python
    python bench/latency.py --bundle B.onnx --peers DENSE_DIR --text-file wiki.test.raw --quick
    python bench/peers.py SPEC_JSON   # one measurement in a fresh process (bench/latency.py runs it)

Files (prepare(): each skipped when it exists, each written under a temporary name and renamed into place), in
CACHE/<dense folder name>-<first 12 hex of the weights' sha256>/, CACHE defaulting to ~/.cache/kninfer/peers:

- llama.cpp/f32.gguf: llama.cpp's converter from the llama-cpp-python sdist of the installed version
  (`pip download --no-deps --no-binary :all: llama-cpp-python==VERSION`, vendor/llama.cpp/convert_hf_to_gguf.py
  with its own gguf-py; it wants torch, transformers 4.57 and sentencepiece, which the kninfer venv with the
  train extra plus `pip install sentencepiece==0.2.3` has), run as
  `python convert_hf_to_gguf.py DENSE_DIR --outtype f32 --outfile f32.gguf`.
- llama.cpp/{f16,q8_0,q4_k_m}.gguf: `llama_cpp.llama_model_quantize(f32.gguf, OUT, params)` with
  `llama_model_quantize_default_params()` and `ftype` LLAMA_FTYPE_MOSTLY_F16 / _Q8_0 / _Q4_K_M, no imatrix.
  Q4_K_M needs rows that are multiples of 256; SmolLM2-135M's are 576 wide, so llama.cpp falls back to Q5_0 /
  Q8_0 for many tensors: peers.json lists every file's tensor types (`tensor_types`) so the mix is on record.
- onnxruntime-genai/{fp32,int4}/: onnxruntime-genai's model builder,
  `python -m onnxruntime_genai.models.builder -i DENSE_DIR -o OUT -p fp32|int4 -e cpu -c TMP_CACHE`
  (int4 with `--extra_options accuracy_level=4 block_size=32 is_symmetric=true`: the builder's CPU defaults,
  stated, and kninfer's `export --int4` settings). The builder wants transformers 5.x and onnx_ir, which kninfer's
  pins exclude, so it runs from a separate venv, made with
      python3.11 -m venv /tmp/peers/genai-venv
      /tmp/peers/genai-venv/bin/pip install torch==2.13.0 transformers==5.24.0 onnx-ir==1.1.0 onnx==1.23.2 \\
          onnxruntime-genai==0.18.0     # pulls onnxruntime 1.32.0 into that venv; torch: the +cpu wheel
  (transformers 5.25.0 asked for kernels>=0.19.1, which the package index lacked) and passed as
  --builder-python (or $KNINFER_GENAI_BUILDER). The runtime package onnxruntime-genai goes in kninfer's venv.
- peers.json: for every file the tool, versions, command, seconds taken and tensor types.

Measurements (`python bench/peers.py SPEC_JSON`, one process each): the `latency` and `memory` jobs are
bench/measure.py's own functions with its `open_model` pointed at the peer engines below, so prompt ids
(numpy's default_rng(0) over the model's vocabulary and trained context), warm-up, repeats, fixed past lengths
(each decode step is undone within the timed call, as TorchModel crops its cache: llama.cpp drops the token
from its KV cache, onnxruntime-genai rewinds its generator) and peak RSS are measured alike. Engine settings:
llama.cpp with Llama's defaults (mmap, f16 KV cache) but n_ctx sized to the job, n_batch = min(n_ctx, 1024),
n_threads = n_threads_batch = threads; onnxruntime-genai with intra-op threads = threads, inter-op 1
(Config.overlay) and max_length sized to the job (its KV buffer is allocated at max_length). `perplexity` scores the
token ids of the dense folder's tokenizer.json with kninfer.runtime.perplexity's own windows and arithmetic
(llama.cpp: `Llama(..., logits_all=True)`, one evaluation per window, its per-position logits;
onnxruntime-genai: one generator per window, `append_tokens(window)`, `get_output("logits")`). Batch 1 only.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = Path.home() / ".cache" / "kninfer" / "peers"
LLAMA, GENAI = "llama.cpp", "onnxruntime-genai"
RUNTIMES = (LLAMA, GENAI)
# llama.cpp file -> llama_ftype constant it is quantized to from f32.gguf (None: the converter's own output)
LLAMA_VARIANTS = {"f32": None, "f16": "LLAMA_FTYPE_MOSTLY_F16", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
                  "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
GENAI_VARIANTS = {"fp32": ["-p", "fp32"],
                  "int4": ["-p", "int4", "--extra_options", "accuracy_level=4", "block_size=32", "is_symmetric=true"]}
VARIANTS = [f"{LLAMA}/{v}" for v in LLAMA_VARIANTS] + [f"{GENAI}/{v}" for v in GENAI_VARIANTS]
LLAMA_KV_BYTES = 2  # llama.cpp's default KV cache type is f16
GENAI_KV_BYTES = 4  # the builder's CPU models keep the KV cache in fp32 (fp32 and int4 alike)


# ---------------------------------------------------------------- preparing the peer models


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def weights_key(dense: Path) -> str:
    """<folder name>-<first 12 hex of the sha256 of its weight files>: a cache folder per set of weights."""
    digest = hashlib.sha256()
    for path in sorted(dense.glob("*.safetensors")) or sorted(dense.glob("*.bin")):
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
    return f"{dense.name}-{digest.hexdigest()[:12]}"


def safetensors_parameters(dense: Path) -> int | None:
    """Parameter count from the safetensors headers (no torch); None without safetensors files."""
    total, files = 0, sorted(dense.glob("*.safetensors"))
    for path in files:
        with path.open("rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        for name, entry in header.items():
            if name != "__metadata__":
                total += int(np.prod(entry["shape"], dtype=np.int64))
    return total if files else None


def peer_path(folder: Path, variant: str) -> Path:
    """Where a variant ("llama.cpp/q8_0", "onnxruntime-genai/int4") lives in a model's cache folder: the .gguf
    file, or the genai folder's model.onnx."""
    runtime, name = variant.split("/")
    return folder / runtime / f"{name}.gguf" if runtime == LLAMA else folder / runtime / name / "model.onnx"


def gguf_tensor_types(path: Path) -> dict[str, int] | None:
    """{ggml type name: tensor count} of a GGUF file (None without the gguf package)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return None
    counts: dict[str, int] = {}
    for tensor in GGUFReader(path).tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return dict(sorted(counts.items()))


def llama_converter(cache: Path, progress: Callable[[str], None]) -> Path:
    """convert_hf_to_gguf.py of the installed llama-cpp-python's sdist, downloaded and unpacked once."""
    found = package_version("llama-cpp-python")
    if found is None:
        raise RuntimeError("llama-cpp-python is not installed: pip install 'kninfer[peers]' (see pyproject.toml)")
    root = cache / "_sdist" / f"llama_cpp_python-{found}"
    script = root / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    progress(f"downloading the llama-cpp-python {found} sdist for llama.cpp's convert_hf_to_gguf.py")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={found}", "-d", tmp], check=True, capture_output=True, text=True)
        archive = next(Path(tmp).glob("*.tar.gz"))
        wanted = ("vendor/llama.cpp/convert_hf_to_gguf.py", "vendor/llama.cpp/conversion/", "vendor/llama.cpp/gguf-py/")
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.name.split("/", 1)[-1].startswith(wanted)]
            tar.extractall(tmp, members=members, filter="data")
        unpacked = Path(tmp) / f"llama_cpp_python-{found}"
        root.parent.mkdir(parents=True, exist_ok=True)
        os.replace(unpacked, root)
    return script


def prepare(dense: Path, cache: Path = DEFAULT_CACHE, variants: Iterable[str] = VARIANTS,
            builder_python: str | None = None, threads: int = os.cpu_count() or 1,
            progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Make the peer files of `variants` from the Hugging Face folder `dense`, skipping those that exist.

    Returns the folder's peers.json: {folder, source, parameters, files: {variant: {path, tool, command, ...}}}.
    """
    from kninfer.atomic import atomic_path

    dense = Path(dense).resolve()
    if not (dense / "config.json").is_file() or not (dense / "tokenizer.json").is_file():
        raise RuntimeError(f"'{dense}' is not a Hugging Face model folder with a tokenizer.json")
    variants = list(variants)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise RuntimeError(f"unknown peer variant(s) {', '.join(unknown)}: expected some of {', '.join(VARIANTS)}")
    missing = [package for runtime, package in ((LLAMA, "llama-cpp-python"), (GENAI, "onnxruntime-genai"))
               if any(v.startswith(runtime + "/") for v in variants) and package_version(package) is None]
    if missing:
        raise RuntimeError(f"{' and '.join(missing)} not installed: pip install 'kninfer[peers]' (pyproject.toml says "
                           "how to build llama-cpp-python)")
    folder = Path(cache).expanduser().resolve() / weights_key(dense)
    folder.mkdir(parents=True, exist_ok=True)
    record_path = folder / "peers.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    record |= {"folder": str(folder), "source": str(dense), "parameters": safetensors_parameters(dense),
               "tokenizer": str(dense / "tokenizer.json")}
    record.setdefault("files", {})

    def save(variant: str, entry: dict[str, Any]) -> None:
        record["files"][variant] = entry
        with atomic_path(record_path) as tmp:
            tmp.write_text(json.dumps(record, indent=1) + "\n")

    llama = [v.split("/")[1] for v in variants if v.startswith(LLAMA + "/")]
    f32 = peer_path(folder, f"{LLAMA}/f32")
    if llama and not f32.is_file():
        script = llama_converter(Path(cache).expanduser().resolve(), progress)
        progress(f"{LLAMA}/f32: converting {dense} with {script}")
        start = time.perf_counter()
        with atomic_path(f32) as tmp:
            command = [sys.executable, str(script), str(dense), "--outtype", "f32", "--outfile", str(tmp)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"convert_hf_to_gguf.py failed: {done.stderr.strip()[-2000:]}")
        save(f"{LLAMA}/f32", {"path": str(f32), "tool": f"llama.cpp convert_hf_to_gguf.py (llama-cpp-python "
                                                    f"{package_version('llama-cpp-python')} sdist)",
                              "command": ["python", "convert_hf_to_gguf.py", str(dense), "--outtype", "f32",
                                          "--outfile", f32.name],
                              "versions": {k: package_version(k) for k in ("torch", "transformers", "sentencepiece")},
                              "seconds": time.perf_counter() - start, "tensor_types": gguf_tensor_types(f32)})
    for name in llama:
        out = peer_path(folder, f"{LLAMA}/{name}")
        if LLAMA_VARIANTS[name] is None or out.is_file():
            continue
        import ctypes

        import llama_cpp

        progress(f"{LLAMA}/{name}: quantizing f32.gguf")
        start = time.perf_counter()
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, LLAMA_VARIANTS[name])
        params.nthread = threads
        with atomic_path(out) as tmp:
            if llama_cpp.llama_model_quantize(str(f32).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
                raise RuntimeError(f"llama_model_quantize to {name} failed")
        save(f"{LLAMA}/{name}", {"path": str(out), "tool": f"llama-cpp-python {llama_cpp.__version__}",
                                 "command": ["llama_cpp.llama_model_quantize", f32.name, out.name,
                                             f"ftype={LLAMA_VARIANTS[name]}", f"nthread={threads}"],
                                 "seconds": time.perf_counter() - start, "tensor_types": gguf_tensor_types(out)})

    for name in (v.split("/")[1] for v in variants if v.startswith(GENAI + "/")):
        out = peer_path(folder, f"{GENAI}/{name}")
        if out.is_file():
            continue
        python = builder_python or os.environ.get("KNINFER_GENAI_BUILDER")
        if not python:
            raise RuntimeError(f"{GENAI}/{name} is not built yet: pass --builder-python (or set "
                               "KNINFER_GENAI_BUILDER) to a venv's python with onnxruntime-genai's model builder, "
                               "transformers 5.x and onnx_ir (bench/peers.py's docstring says how to make it)")
        progress(f"{GENAI}/{name}: building with {python}")
        start = time.perf_counter()
        with atomic_path(out.parent, directory=True, kind="peer-onnxruntime-genai") as tmp, \
                tempfile.TemporaryDirectory(dir=folder) as hf_cache:
            args = ["-i", str(dense), "-o", str(tmp), *GENAI_VARIANTS[name], "-e", "cpu", "-c", hf_cache]
            done = subprocess.run([python, "-m", "onnxruntime_genai.models.builder", *args], capture_output=True,
                                  text=True)
            if done.returncode != 0:
                raise RuntimeError(f"the onnxruntime-genai builder failed: {done.stderr.strip()[-2000:]}")
        builder = subprocess.run([python, "-c", "import json, importlib.metadata as m; print(json.dumps({k: "
                                  "m.version(k) for k in ('onnxruntime-genai', 'onnxruntime', 'transformers', "
                                  "'torch', 'onnx-ir')}))"], capture_output=True, text=True, check=True)
        save(f"{GENAI}/{name}", {"path": str(out), "tool": "onnxruntime_genai.models.builder",
                                 "command": ["python", "-m", "onnxruntime_genai.models.builder", "-i", str(dense),
                                             "-o", str(out.parent), *args[4:-2]],
                                 "versions": json.loads(builder.stdout), "seconds": time.perf_counter() - start})
    return record


# ---------------------------------------------------------------- static facts for the bench table


def describe(path: Path, runtime: str, parameters: int | None, batch: int, past_lengths: list[int],
             onnx_weights: Callable[[Path], dict[str, int] | None]) -> dict[str, Any]:
    """bench/latency.py's describe() for a peer: model_type, layers, parameters, file bytes, weight bytes
    (total and read per decode step) and KV-cache bytes read per step at each past length."""
    path = Path(path)
    if runtime == LLAMA:
        file_bytes, weights = path.stat().st_size, None
        try:
            from gguf import GGUFReader

            reader = GGUFReader(path)
            meta = {f.name: f.contents() for f in reader.fields.values() if f.name.startswith("llama.")}
            layers, heads = meta["llama.block_count"], meta["llama.attention.head_count"]
            kv_heads, head_dim = meta["llama.attention.head_count_kv"], meta["llama.embedding_length"] // heads
            total = sum(int(t.n_bytes) for t in reader.tensors)
            # the embedding is also the (tied) LM head: every step reads every tensor in full
            weights = {"total": total, "always": total, "row": 0}
        except ImportError:
            layers = kv_heads = head_dim = None
        kv_item = LLAMA_KV_BYTES
    else:
        config = json.loads((path.parent / "genai_config.json").read_text())["model"]["decoder"]
        layers, kv_heads, head_dim = config["num_hidden_layers"], config["num_key_value_heads"], config["head_size"]
        file_bytes = sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith(path.name))
        weights = onnx_weights(path)
        kv_item = GENAI_KV_BYTES
    kv_step = (None if layers is None else
               {str(p): 2 * layers * batch * kv_heads * head_dim * p * kv_item for p in past_lengths})
    return {"model_type": "llama", "layers": layers, "parameters": parameters, "file_bytes": file_bytes,
            "weight_bytes": weights and weights["total"],
            "weight_bytes_per_step": weights and weights["always"] + batch * weights["row"],
            "kv_bytes_per_step": kv_step}


# ---------------------------------------------------------------- the engines, behind bench/measure.py's calls


def context_needed(spec: dict[str, Any]) -> int:
    """Tokens a job holds at once: its longest prompt, longest past + 1, 32 + new tokens, or its window."""
    lengths = [*spec.get("prompt_lengths", []), *(p + 1 for p in spec.get("past_lengths", []))]
    if "new_tokens" in spec:
        lengths.append(32 + spec["new_tokens"])
    if "window" in spec:
        lengths.append(spec["window"])
    return max(lengths, default=512)


class LlamaCppModel:
    """A GGUF in llama-cpp-python's Llama, behind bench/measure.py's prefill / step / extend; the "cache" is the
    number of tokens the context holds (the KV cache itself lives inside llama.cpp)."""

    def __init__(self, path: str, threads: int, n_ctx: int, logits_all: bool = False) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=path, n_ctx=n_ctx, n_batch=min(n_ctx, 1024), n_threads=threads,
                         n_threads_batch=threads, logits_all=logits_all, verbose=False)
        self.vocab, self.context = self.llm.n_vocab(), self.llm._model.n_ctx_train()

    def _eval(self, tokens: list[int]) -> np.ndarray:
        """The last position's logits after evaluating `tokens` (Llama.scores holds them only with logits_all)."""
        self.llm.eval(tokens)
        return np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(1, self.vocab)).copy()

    def _rewind(self, length: int) -> None:
        self.llm.n_tokens = length  # eval() drops cache entries from n_tokens on before it decodes

    def prefill(self, ids: np.ndarray, capacity: int = 0) -> tuple[np.ndarray, int]:
        """Last-position logits after `ids`; llama.cpp's cache is sized at load (n_ctx): no `capacity`."""
        _one_row(ids)
        self.llm.reset()
        return self._eval(ids[0].tolist()), self.llm.n_tokens

    def step(self, token: np.ndarray, cache: int) -> np.ndarray:
        logits, _ = self.extend(token, cache)
        self._rewind(cache)
        return logits

    def extend(self, token: np.ndarray, cache: int) -> tuple[np.ndarray, int]:
        _one_row(token)
        self._rewind(cache)
        return self._eval(token[0].tolist()), self.llm.n_tokens

    def all_logits(self, ids: list[int]) -> np.ndarray:
        """Logits at every position of `ids` (needs logits_all=True), from an empty context."""
        self.llm.reset()
        self.llm.eval(ids)
        return self.llm.scores[: len(ids)].copy()


class GenaiModel:
    """An onnxruntime-genai model folder behind bench/measure.py's calls: one Generator whose KV buffer holds
    `max_length` tokens; the "cache" is its token count, restored with rewind_to."""

    def __init__(self, path: str, threads: int, max_length: int) -> None:
        import onnxruntime_genai as og

        folder = str(Path(path).parent)
        config = og.Config(folder)
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
        self.og, self.model = og, og.Model(config)
        meta = json.loads((Path(folder) / "genai_config.json").read_text())["model"]
        self.vocab, self.context = meta["vocab_size"], meta["context_length"]
        self.max_length = max_length
        self.generator = self._generator()

    def _generator(self) -> Any:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.max_length)
        return self.og.Generator(self.model, params)

    def prefill(self, ids: np.ndarray, capacity: int = 0) -> tuple[np.ndarray, int]:
        """Last-position logits after `ids`; the generator's buffer holds `max_length`: no `capacity`."""
        _one_row(ids)
        self.generator.rewind_to(0)
        self.generator.append_tokens(ids.astype(np.int32))
        return self.generator.get_logits().reshape(1, -1).copy(), ids.shape[1]

    def step(self, token: np.ndarray, cache: int) -> np.ndarray:
        logits, _ = self.extend(token, cache)
        self.generator.rewind_to(cache)
        return logits

    def extend(self, token: np.ndarray, cache: int) -> tuple[np.ndarray, int]:
        _one_row(token)
        if self.generator.token_count() != cache:
            self.generator.rewind_to(cache)
        self.generator.append_tokens(token.astype(np.int32))
        return self.generator.get_logits().reshape(1, -1).copy(), cache + 1

    def all_logits(self, ids: list[int]) -> np.ndarray:
        """Logits at every position of `ids`, from a fresh generator."""
        generator = self._generator()
        generator.append_tokens(np.asarray([ids], np.int32))
        return np.asarray(generator.get_output("logits"))[0].copy()


def _one_row(ids: np.ndarray) -> None:
    if ids.shape[0] != 1:
        raise ValueError(f"the peer engines are measured at batch 1 (got {ids.shape[0]})")


def open_peer(spec: dict[str, Any]) -> LlamaCppModel | GenaiModel:
    """The peer named by the spec, its context sized to the job (bench/measure.py's open_model for peers)."""
    needed = context_needed(spec)
    if spec["runtime"] == LLAMA:
        return LlamaCppModel(spec["path"], spec["threads"], needed, logits_all=spec["job"] == "perplexity")
    if spec["runtime"] == GENAI:
        return GenaiModel(spec["path"], spec["threads"], needed)
    raise ValueError(f"unknown peer runtime {spec['runtime']!r}")


def perplexity(spec: dict[str, Any]) -> dict[str, Any]:
    """A peer's perplexity on the first `max_tokens` ids of a text file under the dense folder's tokenizer.json,
    windows and arithmetic by kninfer.runtime.perplexity (as bench/measure.py's perplexity job for bundles)."""
    from tokenizers import Tokenizer

    from kninfer.runtime.perplexity import perplexity as windowed_perplexity
    from kninfer.runtime.tokenizer import encode

    with open(spec["text_file"], encoding="utf-8") as handle:
        ids = encode(Tokenizer.from_file(spec["tokenizer"]), handle.read())[: spec["max_tokens"]]
    model = open_peer(spec)
    window = min(spec["window"], model.context)
    scorer = SimpleNamespace(bundle=SimpleNamespace(context_length=model.context),
                             prefill=lambda batch, _mask: (model.all_logits(batch[0].tolist())[None], None))
    result = windowed_perplexity(scorer, ids, stride=window // 2, max_length=window)
    return {"perplexity": result.perplexity, "nll": result.nll, "tokens": result.tokens, "window": window,
            "ids_sha256": hashlib.sha256(np.asarray(ids, np.int64).tobytes()).hexdigest()}


def run_job(spec: dict[str, Any]) -> dict[str, Any]:
    """One job in this process: bench/measure.py's latency / memory with the peer engine, or perplexity."""
    if spec["job"] == "perplexity":
        return perplexity(spec)
    import measure

    measure.open_model = open_peer  # the same measurement code as kninfer's bundles, with a peer behind it
    result = measure.JOBS[spec["job"]](spec)
    if spec["runtime"] == LLAMA:
        import llama_cpp

        result["system_info"] = llama_cpp.llama_print_system_info().decode().strip()
    result["context_allocated"] = context_needed(spec)
    return result


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0].lstrip().startswith("{"):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        print(json.dumps(run_job(json.loads(argv[0]))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("prepare", help="Make the peer files from a dense Hugging Face folder.")
    make.add_argument("dense", type=Path, help="The dense Hugging Face model folder (with tokenizer.json).")
    make.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="Where peer files are written and reused.")
    make.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS, metavar="VARIANT",
                      help=f"Which to make (default all: {' '.join(VARIANTS)}).")
    make.add_argument("--builder-python", help="Python of the venv with onnxruntime-genai's model builder "
                                               "(default $KNINFER_GENAI_BUILDER).")
    make.add_argument("--threads", type=int, default=os.cpu_count(), help="Threads for llama.cpp's quantizer.")
    args = parser.parse_args(argv)
    with contextlib.suppress(BrokenPipeError):
        record = prepare(args.dense, args.cache, args.variants, args.builder_python, args.threads,
                         progress=lambda text: print(text, file=sys.stderr))
        print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
