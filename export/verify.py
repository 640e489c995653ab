"""Check an exported graph against PyTorch: onnx.checker, then the runtime's own sessions (prefill + cached decode
steps for a causal LM) against transformers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicCache

from kninfer.runtime.bundle import Bundle
from kninfer.runtime.session import CausalLM, Classifier, position_ids

TOLERANCE = 1e-4  # max |Δlogits| over real positions, fp32 onnxruntime vs PyTorch, per unit of the logits' RMS


@dataclass
class Verification:
    """The largest |Δlogits| between onnxruntime and PyTorch over the real (unpadded) positions, and its bound:
    TOLERANCE times the RMS of PyTorch's logits, at least TOLERANCE itself.

    fp32 rounding grows with the values' scale: a real 30-layer LM (SmolLM2-135M, logits RMS 13.8) differs by
    5.9e-4 under any onnxruntime optimisation level, 4.0e-5 of its RMS; tiny random models keep 1e-4 absolute."""

    max_abs_diff: float
    steps: int
    logits_rms: float = 1.0

    @property
    def bound(self) -> float:
        return TOLERANCE * max(1.0, self.logits_rms)

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.bound


def check_graph(path: str) -> None:
    """onnx.checker with full shape inference (raises onnx.checker.ValidationError)."""
    onnx.checker.check_model(path, full_check=True)


def verify_graph(model: PreTrainedModel, bundle: Bundle) -> Verification:
    """The export's check: a causal LM on a left-padded pair (7 and 4 tokens) and 3 cached greedy steps, a
    classifier on a right-padded batch."""
    if bundle.task == "causal-lm":
        return verify_causal_lm(model, bundle, lengths=[7, 4])
    return verify_classifier(model, bundle)


def left_padded_batch(vocab: int, lengths: list[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random token ids, each row left-padded to the longest length."""
    rng = np.random.default_rng(seed)
    width = max(lengths)
    ids = rng.integers(0, vocab, (len(lengths), width), dtype=np.int64)
    mask = np.array([[0] * (width - n) + [1] * n for n in lengths], np.int64)
    return np.where(mask == 1, ids, 0), mask


@torch.no_grad()
def verify_causal_lm(model: PreTrainedModel, bundle: Bundle, lengths: list[int] = (7,), steps: int = 3,
                     seed: int = 0) -> Verification:
    """Prefill `lengths` (left-padded) then `steps` greedy cached decode steps, in the runtime and in PyTorch."""
    lm = CausalLM(bundle, threads=1)
    ids, mask = left_padded_batch(model.config.vocab_size, list(lengths), seed)
    got, cache = lm.prefill(ids, mask)
    torch_cache, worst, squares = DynamicCache(), 0.0, []
    for step in range(steps + 1):
        if step:
            got, cache = lm.step(ids, mask, cache)
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(position_ids(mask, ids.shape[1])),
                    past_key_values=torch_cache, use_cache=True)
        want = out.logits.float().numpy()
        real = mask[:, -ids.shape[1]:] == 1
        worst = max(worst, float(np.abs(got - want)[real].max()))
        squares.append(np.square(want[real].astype(np.float64)).mean())
        torch_cache = out.past_key_values
        ids = want[:, -1].argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones_like(ids)], axis=1)
    return Verification(worst, steps, float(np.sqrt(np.mean(squares))))


@torch.no_grad()
def verify_classifier(model: PreTrainedModel, bundle: Bundle, lengths: list[int] = (7, 4, 1),
                      seed: int = 0) -> Verification:
    """Right-padded random batch (pad = pad_token_id): logits of both runtimes."""
    rng = np.random.default_rng(seed)
    pad = model.config.pad_token_id
    width = max(lengths)
    ids = rng.integers(0, model.config.vocab_size - 1, (len(lengths), width), dtype=np.int64)
    ids += ids >= pad  # every id but pad: no pad inside the text, wherever pad sits in the vocabulary
    mask = np.array([[1] * n + [0] * (width - n) for n in lengths], np.int64)
    ids = np.where(mask == 1, ids, pad)
    got = Classifier(bundle, threads=1).forward(ids, mask)
    want = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.float().numpy()
    return Verification(float(np.abs(got - want).max()), 0, float(np.sqrt(np.square(want.astype(np.float64)).mean())))


def top1_agreement(reference: Bundle, candidate: Bundle, input_ids: np.ndarray) -> float:
    """Fraction of positions where two causal-LM graphs predict the same next token (one prefill)."""
    mask = np.ones_like(input_ids)
    first, second = (CausalLM(bundle, threads=1).prefill(input_ids, mask)[0].argmax(-1)
                     for bundle in (reference, candidate))
    return float((first == second).mean())
