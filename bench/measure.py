"""One measurement in a fresh process: `python bench/measure.py SPEC_JSON` prints one JSON result line.

Jobs: `latency` (session load, prefill, decode at fixed past lengths, peak RSS), `memory` (peak RSS while
generating N tokens), `perplexity` (a bundle on a text file) and `bandwidth` (large-array read rate).
`runtime` is `onnxruntime` (numpy + onnxruntime only) or `torch` (transformers eager, KV cache on).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far.

    Linux: VmHWM, which starts afresh at exec; ru_maxrss would carry over the parent's peak across fork + exec.
    Elsewhere ru_maxrss (KiB, bytes on macOS).
    """
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def timed(call: Callable[[], Any]) -> float:
    """Milliseconds one call takes."""
    start = time.perf_counter()
    call()
    return (time.perf_counter() - start) * 1e3


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (linear interpolation, as numpy's default)."""
    return float(np.percentile(values, q))


class OrtModel:
    """A causal-LM bundle's runtime session (kninfer's CausalLM) behind the three calls the benchmark makes."""

    def __init__(self, path: str, threads: int, low_memory: bool = False) -> None:
        from kninfer.runtime.bundle import read_bundle
        from kninfer.runtime.session import CausalLM

        # the session alone, not kninfer.load: the tokenizer stays out of the load time and memory figures
        self.lm = CausalLM(read_bundle(path), threads=threads, low_memory=low_memory)
        self.vocab, self.context = self.lm.bundle.vocab_size, self.lm.bundle.context_length

    def prefill(self, ids: np.ndarray, capacity: int = 0) -> tuple[np.ndarray, Any]:
        """Last-position logits and the cache after the prompt `ids`, with room for `capacity` positions."""
        logits, cache = self.lm.prefill(ids, np.ones_like(ids), capacity)
        return logits[:, -1], cache

    def step(self, token: np.ndarray, cache: Any) -> np.ndarray:
        """Last-position logits for one new token per row after `cache`; the cache is set back to its length (a
        shared buffer's next position is written again by the next step)."""
        past = cache.length
        logits, _ = self.extend(token, cache)
        cache.length = past
        return logits

    def extend(self, token: np.ndarray, cache: Any) -> tuple[np.ndarray, Any]:
        """Like `step`, but returns the cache grown by the token (for generation)."""
        mask = np.ones((len(token), cache.length + 1), np.int64)
        logits, cache = self.lm.step(token, mask, cache)
        return logits[:, -1], cache


class TorchModel:
    """A transformers causal LM run eagerly with its DynamicCache, behind the same three calls."""

    def __init__(self, path: str, threads: int) -> None:
        import torch

        from kninfer.modeling.io import load

        torch.set_num_threads(threads)
        self.torch = torch
        self.model, _ = load(path)
        self.vocab, self.context = self.model.config.vocab_size, self.model.config.max_position_embeddings

    def prefill(self, ids: np.ndarray, capacity: int = 0) -> tuple[np.ndarray, Any]:
        """Last-position logits and the cache after the prompt `ids` (a DynamicCache grows: no `capacity`)."""
        with self.torch.inference_mode():
            out = self.model(self.torch.from_numpy(ids), use_cache=True)
        return out.logits[:, -1].numpy(), out.past_key_values

    def step(self, token: np.ndarray, cache: Any) -> np.ndarray:
        """One new token per row; the cache is cropped back so every step sees the same past length."""
        past = cache.get_seq_length()
        logits, _ = self.extend(token, cache)
        cache.crop(past)
        return logits

    def extend(self, token: np.ndarray, cache: Any) -> tuple[np.ndarray, Any]:
        """Last-position logits and the cache grown by the token (DynamicCache grows in place)."""
        with self.torch.inference_mode():
            out = self.model(self.torch.from_numpy(token), past_key_values=cache, use_cache=True)
        return out.logits[:, -1].numpy(), out.past_key_values


def open_model(spec: dict[str, Any]) -> OrtModel | TorchModel:
    """The model named by the spec, in the runtime it asks for."""
    if spec["runtime"] == "onnxruntime":
        return OrtModel(spec["path"], spec["threads"], spec.get("low_memory", False))
    return TorchModel(spec["path"], spec["threads"])


def latency(spec: dict[str, Any]) -> dict[str, Any]:
    """Load time, prefill ms per prompt length, decode ms per step at each fixed past length, peak RSS."""
    rng = np.random.default_rng(0)
    baseline = peak_rss_bytes()
    start = time.perf_counter()
    model = open_model(spec)
    load_s = time.perf_counter() - start
    batch = spec["batch"]
    ids = rng.integers(0, model.vocab, (batch, model.context), dtype=np.int64)

    prefill_ms = {}
    for length in spec["prompt_lengths"]:
        if length > model.context:
            continue
        prompt = ids[:, :length]
        times = [timed(lambda: model.prefill(prompt)) for _ in range(1 + spec["prefill_repeats"])]  # noqa: B023
        prefill_ms[str(length)] = statistics.median(times[1:])  # the first call is warm-up

    decode_ms = {}
    for past in spec["past_lengths"]:
        if past + 1 > model.context:
            continue
        logits, cache = model.prefill(ids[:, :past], capacity=past + 1)
        times = []
        for _ in range(spec["warmup_steps"] + spec["decode_steps"]):
            token = logits.argmax(-1)[:, None].astype(np.int64)
            start = time.perf_counter()
            logits = model.step(token, cache)
            times.append((time.perf_counter() - start) * 1e3)
        steps = times[spec["warmup_steps"]:]
        decode_ms[str(past)] = {"p50": percentile(steps, 50), "p90": percentile(steps, 90), "steps": steps}
    return {"load_s": load_s, "prefill_ms": prefill_ms, "decode_ms": decode_ms,
            "baseline_rss_bytes": baseline, "peak_rss_bytes": peak_rss_bytes()}


def memory(spec: dict[str, Any]) -> dict[str, Any]:
    """Peak RSS while greedily generating `new_tokens` tokens (never stopping at EOS) after a 32-token prompt."""
    model = open_model(spec)
    prompt = min(32, model.context - 1)
    new = min(spec["new_tokens"], model.context - prompt)
    ids = np.random.default_rng(0).integers(0, model.vocab, (spec["batch"], prompt), dtype=np.int64)
    logits, cache = model.prefill(ids, capacity=prompt + new)
    for _ in range(new - 1):
        logits, cache = model.extend(logits.argmax(-1)[:, None].astype(np.int64), cache)
    return {"peak_rss_bytes": peak_rss_bytes(), "new_tokens": new}


def perplexity(spec: dict[str, Any]) -> dict[str, Any]:
    """kninfer.runtime.perplexity on the first `max_tokens` tokens of a text file."""
    import kninfer
    from kninfer.runtime.perplexity import perplexity as bundle_perplexity
    from kninfer.runtime.tokenizer import encode

    lm = kninfer.load(spec["path"], threads=spec["threads"])
    with open(spec["text_file"], encoding="utf-8") as handle:
        ids = encode(lm.tokenizer, handle.read())[: spec["max_tokens"]]
    window = min(spec["window"], lm.info.context_length)
    result = bundle_perplexity(lm.session, ids, stride=window // 2, max_length=window)
    return {"perplexity": result.perplexity, "nll": result.nll, "tokens": result.tokens, "window": window}


def bandwidth(spec: dict[str, Any]) -> dict[str, Any]:
    """Read bandwidth (GB/s) over a >1 GB array, best of `repeats` each: numpy sum (float32) on one thread and on
    `threads` threads, a BLAS matrix-vector product (the read pattern of a decode step), and the max of its bytes on
    `threads` threads (one SIMD compare per 32 bytes: bound by memory, not arithmetic); `gb_s` is the best."""
    array = np.ones(spec["bytes"] // 4, np.float32)  # np.ones writes every page, so none is lazily mapped
    chunks, matrix = np.array_split(array, spec["threads"]), array.reshape(-1, 4096)
    byte_chunks = np.array_split(array.view(np.uint8), spec["threads"])
    ones = np.ones(4096, np.float32)
    result = {"bytes": array.nbytes}
    with ThreadPoolExecutor(spec["threads"]) as pool:  # numpy releases the GIL inside the reduction
        probes = {"sum_1_thread": array.sum, "sum_threads": lambda: list(pool.map(np.sum, chunks)),
                  "gemv": lambda: matrix @ ones, "max_bytes_threads": lambda: list(pool.map(np.max, byte_chunks))}
        for name, read in probes.items():
            read()
            best_ms = min(timed(read) for _ in range(spec["repeats"]))
            result[f"{name}_gb_s"] = array.nbytes / best_ms / 1e6
    result["gb_s"] = max(result[f"{name}_gb_s"] for name in probes)
    result["probe"] = max(probes, key=lambda name: result[f"{name}_gb_s"])
    return result


JOBS = {"latency": latency, "memory": memory, "perplexity": perplexity, "bandwidth": bandwidth}

if __name__ == "__main__":
    job = json.loads(sys.argv[1])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(json.dumps(JOBS[job["job"]](job)))
