"""Sliding-window perplexity of a causal-LM bundle (the Hugging Face recipe: windows of max_length, step stride)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kninfer.errors import KninferError
from kninfer.runtime.session import CausalLM


@dataclass(frozen=True)
class Perplexity:
    """The result: perplexity, mean negative log-likelihood (nats) and how many tokens were scored."""

    perplexity: float
    nll: float
    tokens: int


def lm_text(raw: str) -> str:
    """A text file as the Hugging Face recipe (and `kninfer eval-lm`) scores it: its lines joined by blank lines."""
    return "\n\n".join(raw.splitlines(keepends=True))


def windows(length: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, new targets) per window: each scores only the tokens the previous window did not."""
    spans, previous_end = [], 0
    for begin in range(0, length, stride):
        end = min(begin + max_length, length)
        spans.append((begin, end, end - previous_end))
        previous_end = end
        if end == length:
            break
    return spans


def perplexity(model: CausalLM, ids: list[int], stride: int | None = None, max_length: int | None = None,
               on_window: Callable[[int], None] | None = None) -> Perplexity:
    """Perplexity of the token sequence `ids`; `on_window` is called with each window's new target count."""
    context = model.bundle.context_length
    max_length = context if max_length is None else max_length
    if not 2 <= max_length <= context:
        raise KninferError(f"--max-length {max_length}: a window must hold at least 2 tokens (one predicts the "
                           f"next) and at most the context ({context})")
    stride = max_length // 2 if stride is None else stride
    if not 0 < stride <= max_length:
        raise KninferError(f"--stride {stride}: expected 1 to the window length ({max_length})")
    if len(ids) < 2:
        raise KninferError(f"the text has {len(ids)} token(s): perplexity needs at least 2")
    nll_sum, scored = 0.0, 0
    for begin, end, new in windows(len(ids), max_length, stride):
        # position t predicts token t + 1; score the last `new` tokens that have a prediction
        count = min(new, end - begin - 1)
        if on_window is not None:
            on_window(new)
        if count == 0:  # a last window of one token (stride = window) has nothing to predict it
            continue
        window = np.asarray(ids[begin:end], np.int64)[None]
        mask = np.ones_like(window)
        positions = np.arange(window.shape[1], dtype=np.int64)[None]
        logits, _ = model.forward(window, mask, positions, model.empty_cache(1))
        scores = logits[0, -count - 1:-1].astype(np.float64)
        targets = window[0, -count:]
        top = scores.max(axis=-1)
        log_z = top + np.log(np.exp(scores - top[:, None]).sum(axis=-1))
        nll_sum += float((log_z - scores[np.arange(count), targets]).sum())
        scored += count
    nll = nll_sum / scored
    return Perplexity(perplexity=math.exp(nll), nll=nll, tokens=scored)
