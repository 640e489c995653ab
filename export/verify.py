"""Check an exported graph against PyTorch: onnx.checker, then prefill + cached decode steps through onnxruntime."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import torch
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicCache

TOLERANCE = 1e-4


def position_ids(attention_mask: np.ndarray) -> np.ndarray:
    """transformers' generate(): cumsum(mask) - 1, with masked positions set to 1."""
    positions = np.cumsum(attention_mask, axis=-1) - 1
    return np.where(attention_mask == 0, 1, positions).astype(np.int64)


class CachedRunner:
    """Runs a causal-LM graph step by step, feeding each step's `present.*` back as `past_key_values.*`."""

    def __init__(self, session: ort.InferenceSession, num_layers: int, num_heads: int, head_dim: int) -> None:
        self.session, self.num_layers, self.num_heads, self.head_dim = session, num_layers, num_heads, head_dim
        self.past: list[np.ndarray] = []

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Logits for `input_ids` (batch, seq), `attention_mask` covering past + seq."""
        if not self.past:
            empty = np.zeros((input_ids.shape[0], self.num_heads, 0, self.head_dim), np.float32)
            self.past = [empty] * (2 * self.num_layers)
        feed = {"input_ids": input_ids, "attention_mask": attention_mask,
                "position_ids": position_ids(attention_mask)[:, -input_ids.shape[1]:]}
        for i in range(self.num_layers):
            feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = self.past[2 * i: 2 * i + 2]
        logits, *self.past = self.session.run(None, feed)
        return logits


@dataclass
class Verification:
    """The largest |Δlogits| between onnxruntime and PyTorch, over the real (unpadded) positions."""

    max_abs_diff: float
    steps: int

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= TOLERANCE


def check_graph(path: str) -> None:
    """onnx.checker with full shape inference (raises onnx.checker.ValidationError)."""
    onnx.checker.check_model(path, full_check=True)


def session(path: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def left_padded_batch(vocab: int, lengths: list[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random token ids, each row left-padded to the longest length."""
    rng = np.random.default_rng(seed)
    width = max(lengths)
    ids = rng.integers(0, vocab, (len(lengths), width), dtype=np.int64)
    mask = np.array([[0] * (width - n) + [1] * n for n in lengths], np.int64)
    return np.where(mask == 1, ids, 0), mask


@torch.no_grad()
def verify_causal_lm(model: PreTrainedModel, onnx_path: str, lengths: list[int] = (7,), steps: int = 3,
                     seed: int = 0) -> Verification:
    """Prefill `lengths` (left-padded) then `steps` greedy cached decode steps in both runtimes."""
    config = model.config
    runner = CachedRunner(session(onnx_path), config.n_layer, config.n_head, config.n_embd // config.n_head)
    ids, mask = left_padded_batch(config.vocab_size, list(lengths), seed)
    cache, worst = DynamicCache(), 0.0
    for _ in range(steps + 1):
        got = runner.step(ids, mask)
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(position_ids(mask)[:, -ids.shape[1]:]),
                    past_key_values=cache, use_cache=True)
        want = out.logits.float().numpy()
        real = mask[:, -ids.shape[1]:] == 1
        worst = max(worst, float(np.abs(got - want)[real].max()))
        cache = out.past_key_values
        ids = want[:, -1].argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones_like(ids)], axis=1)
    return Verification(worst, steps)


@torch.no_grad()
def verify_classifier(model: PreTrainedModel, onnx_path: str, lengths: list[int] = (7, 4, 1),
                      seed: int = 0) -> Verification:
    """Right-padded random batch (pad = pad_token_id): logits of both runtimes."""
    rng = np.random.default_rng(seed)
    pad = model.config.pad_token_id
    width = max(lengths)
    ids = rng.integers(0, model.config.vocab_size - 1, (len(lengths), width), dtype=np.int64)
    ids += ids >= pad  # every id but pad: no pad inside the text, wherever pad sits in the vocabulary
    mask = np.array([[1] * n + [0] * (width - n) for n in lengths], np.int64)
    ids = np.where(mask == 1, ids, pad)
    (got,) = session(onnx_path).run(["logits"], {"input_ids": ids, "attention_mask": mask})
    want = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.float().numpy()
    return Verification(float(np.abs(got - want).max()), 0)


def top1_agreement(reference: str, candidate: str, input_ids: np.ndarray) -> float:
    """Fraction of positions where two causal-LM graphs predict the same next token (one prefill)."""
    predictions = []
    for path in (reference, candidate):
        s = session(path)
        kv = [i for i in s.get_inputs() if i.name.startswith("past_key_values.")]
        runner = CachedRunner(s, len(kv) // 2, kv[0].shape[1], kv[0].shape[3])
        predictions.append(runner.step(input_ids, np.ones_like(input_ids)).argmax(-1))
    return float((predictions[0] == predictions[1]).mean())
