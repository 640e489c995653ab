"""onnxruntime sessions for a bundle's graph: the causal LM with its KV cache, and the classifier."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from kninfer.errors import KninferError
from kninfer.runtime.bundle import Bundle

OPTIMIZATION = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
# MatMulNBits' pre-packing replaces its weights rather than copying them, and without it each step packs anew:
# --low-memory keeps it on for these variants (dense SmolLM2-135M int4, 256 tokens: RSS 252 MB packed, 383 not)
PACKED_VARIANTS = ("int8", "int4")


def open_session(bundle: Bundle, threads: int | None = None, optimization: str = "all",
                 low_memory: bool = False) -> ort.InferenceSession:
    """A CPU InferenceSession on the bundle's graph; `threads` None lets onnxruntime use every core; `low_memory`
    turns off the pre-packed copies of fp32 and int8-dynamic MatMul weights."""
    if optimization not in OPTIMIZATION:
        raise KninferError(f"unknown optimisation level {optimization!r}: expected one of {', '.join(OPTIMIZATION)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = OPTIMIZATION[optimization]
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    options.log_severity_level = 4  # failures come back as exceptions, made one-line errors: no log lines besides
    # MLAS keeps a pre-packed copy of each fp32 MatMul weight: ~180 MB on GPT-2 small, ~10% faster decode
    if low_memory and bundle.meta.get("variant") not in PACKED_VARIANTS:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if threads is not None:
        if threads < 1:
            raise KninferError(f"--threads is {threads}: expected 1 or more")
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(bundle.onnx_path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime's pybind errors (InvalidProtobuf, Fail, ...) share no base class
        raise KninferError(f"'{bundle.onnx_path}' is not a loadable ONNX model: {_first_line(error)}") from None


def _check_io(session: ort.InferenceSession, bundle: Bundle, inputs: list[str], outputs: list[str]) -> None:
    """The graph's inputs and outputs must be exactly those kninfer.json promises."""
    found = sorted(i.name for i in session.get_inputs()), {o.name for o in session.get_outputs()}
    if found[0] != sorted(inputs) or not set(outputs) <= found[1]:
        raise _mismatch(bundle, f"graph inputs {found[0]}, outputs {sorted(found[1])}; expected inputs "
                                f"{sorted(inputs)}, outputs {outputs}")


def _check_dims(bundle: Bundle, node: ort.NodeArg, expected: dict[int, int]) -> None:
    """The static sizes of a graph input or output (axis -> size) must be kninfer.json's; symbolic ones pass."""
    for axis, size in expected.items():
        found = node.shape[axis] if -len(node.shape) <= axis < len(node.shape) else None
        if isinstance(found, int) and found != size:
            raise _mismatch(bundle, f"{node.name} has size {found} on axis {axis}, kninfer.json implies {size}")


def _output(session: ort.InferenceSession, name: str) -> ort.NodeArg:
    return next(o for o in session.get_outputs() if o.name == name)


def _mismatch(bundle: Bundle, detail: str) -> KninferError:
    return KninferError(f"'{bundle.onnx_path}' does not match its kninfer.json ({bundle.task}): {detail}")


def _run(model: CausalLM | Classifier, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """session.run; a graph that kninfer.json over-promises (a context past its positions) fails in one line."""
    with _one_line_errors(model):
        return model.session.run(outputs, feeds)


@contextmanager
def _one_line_errors(model: CausalLM | Classifier) -> Iterator[None]:
    try:
        yield
    except Exception as error:  # onnxruntime's pybind errors share no base class
        raise KninferError(f"onnxruntime failed to run '{model.bundle.onnx_path}': {_first_line(error)}") from None


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def position_ids(attention_mask: np.ndarray, length: int) -> np.ndarray:
    """Positions of the last `length` tokens, as transformers' generate() builds them: cumsum(mask) - 1, padding
    at 1."""
    positions = np.cumsum(attention_mask, axis=1) - 1
    positions[attention_mask == 0] = 1
    return positions[:, -length:]


@dataclass
class KVCache:
    """Every layer's key and value, (batch, kv_heads, positions, head_dim), in `past_names` order, and how many
    positions hold tokens. A shared-buffer graph (kv_cache.shared_buffer) writes each step's keys and values into
    `arrays` where they are: they hold `capacity` positions and `binding` binds each to both its past input and its
    present output. Otherwise a step returns new arrays, `length` positions long."""

    arrays: list[np.ndarray]
    length: int
    binding: ort.IOBinding | None = None

    @property
    def capacity(self) -> int:
        """Positions the arrays can hold."""
        return self.arrays[0].shape[2]


class CausalLM:
    """A causal-LM bundle: one graph for the prompt and for every later step, the KV cache fed back."""

    def __init__(self, bundle: Bundle, threads: int | None = None, optimization: str = "all",
                 low_memory: bool = False) -> None:
        if bundle.task != "causal-lm" or bundle.kv_cache is None:
            raise KninferError(f"'{bundle.onnx_path}' is a {bundle.task} bundle: text generation needs causal-lm")
        self.bundle, self.kv = bundle, bundle.kv_cache
        self.session = open_session(bundle, threads, optimization, low_memory)
        inputs = {i.name: i for i in self.session.get_inputs()}
        if len(inputs) != 3 + 2 * self.kv.num_layers:  # before building names: num_layers comes from a file
            raise _mismatch(bundle, f"the graph has {len(inputs)} inputs, kv_cache.num_layers "
                                    f"{self.kv.num_layers} needs {3 + 2 * self.kv.num_layers}")
        self.past_names, self.present_names = self.kv.past_names(), self.kv.present_names()
        _check_io(self.session, bundle, ["input_ids", "attention_mask", "position_ids", *self.past_names],
                  ["logits", *self.present_names])
        for name in self.past_names:
            _check_dims(bundle, inputs[name], {1: self.kv.num_heads, 3: self.kv.head_dim})
        logits = _output(self.session, "logits")
        _check_dims(bundle, logits, {-1: bundle.vocab_size})
        self.cache_dtype = NUMPY_TYPES.get(inputs[self.past_names[0]].type, np.float32)
        self.logits_dtype = NUMPY_TYPES.get(logits.type, np.float32)

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                capacity: int = 0) -> tuple[np.ndarray, KVCache]:
        """Logits (batch, seq, vocab) of a prompt (left-padded if a batch) and the cache it leaves; a shared-buffer
        cache reserves `capacity` positions (at least the prompt's; it grows when a step needs more)."""
        cache = self.empty_cache(len(input_ids), max(capacity, attention_mask.shape[1]))
        return self.step(input_ids, attention_mask, cache)

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray,
             cache: KVCache) -> tuple[np.ndarray, KVCache]:
        """Logits of `input_ids` (batch, new) after `cache`, and the cache grown by them; `attention_mask` covers
        the cache and the new tokens."""
        return self.forward(input_ids, attention_mask, position_ids(attention_mask, input_ids.shape[1]), cache)

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                cache: KVCache) -> tuple[np.ndarray, KVCache]:
        """Logits (batch, seq, vocab) as float32 and the cache extended by `input_ids`: the one passed in, updated,
        for a shared-buffer graph (a larger one when it was full), new arrays otherwise."""
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        length = attention_mask.shape[1]
        if cache.binding is None:
            # Plain `run`: on CPU it wraps outputs without copying and reads contiguous inputs in place
            logits, *present = _run(self, ["logits", *self.present_names],
                                    feeds | dict(zip(self.past_names, cache.arrays, strict=True)))
            return logits.astype(np.float32, copy=False), KVCache(present, length)
        if length > cache.capacity:
            cache = self.empty_cache(len(input_ids), max(length, 2 * cache.capacity), cache)
        logits = np.empty((*input_ids.shape, self.bundle.vocab_size), self.logits_dtype)
        for name, value in feeds.items():
            cache.binding.bind_cpu_input(name, np.ascontiguousarray(value))
        cache.binding.bind_output("logits", "cpu", 0, logits.dtype, logits.shape, logits.ctypes.data)
        with _one_line_errors(self):
            self.session.run_with_iobinding(cache.binding)
        cache.length = length
        return logits.astype(np.float32, copy=False), cache

    def empty_cache(self, batch: int, capacity: int = 0, filled: KVCache | None = None) -> KVCache:
        """A cache for `batch` rows: for a shared-buffer graph `capacity` positions bound to past and present (with
        the tokens of `filled` copied in), otherwise zero positions."""
        shared = self.kv.shared_buffer
        shape = (batch, self.kv.num_heads, capacity if shared else 0, self.kv.head_dim)
        arrays = [np.zeros(shape, self.cache_dtype) for _ in self.past_names]
        if not shared:
            return KVCache(arrays, 0)
        if filled is not None:
            for array, old in zip(arrays, filled.arrays, strict=True):
                array[:, :, :filled.length] = old[:, :, :filled.length]
        binding = self.session.io_binding()
        for past, present, array in zip(self.past_names, self.present_names, arrays, strict=True):
            binding.bind_input(past, "cpu", 0, array.dtype, shape, array.ctypes.data)
            binding.bind_output(present, "cpu", 0, array.dtype, shape, array.ctypes.data)
        return KVCache(arrays, 0 if filled is None else filled.length, binding)


class Classifier:
    """A sequence-classification bundle: token ids and mask in, one row of label logits per sequence out."""

    def __init__(self, bundle: Bundle, threads: int | None = None, optimization: str = "all",
                 low_memory: bool = False) -> None:
        if bundle.task != "sequence-classification":
            raise KninferError(f"'{bundle.onnx_path}' is a {bundle.task} bundle: "
                               "classify needs sequence-classification")
        self.bundle = bundle
        self.session = open_session(bundle, threads, optimization, low_memory)
        _check_io(self.session, bundle, ["input_ids", "attention_mask"], ["logits"])
        if bundle.labels is not None:
            _check_dims(bundle, _output(self.session, "logits"), {-1: len(bundle.labels)})

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Logits (batch, num_labels) as float32."""
        (logits,) = _run(self, ["logits"], {"input_ids": input_ids, "attention_mask": attention_mask})
        labels = self.bundle.labels
        if labels is not None and logits.shape[-1] != len(labels):  # a symbolic size passes the check at load
            raise _mismatch(self.bundle, f"logits has size {logits.shape[-1]}, kninfer.json lists {len(labels)} "
                                         "labels")
        return logits.astype(np.float32, copy=False)
