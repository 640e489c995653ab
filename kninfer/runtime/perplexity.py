"""Sliding-window perplexity of a causal-LM bundle, and the two rules the torch side (train/eval_lm.py) shares."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
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


def lm_text(text: str) -> str:
    """A text file's content as `kninfer eval` and `eval-lm` score it: its lines, line ends kept, joined by blank
    lines (the Hugging Face recipe: `datasets` reads a text file as lines, the recipe joins them with "\\n\\n")."""
    return "\n\n".join(text.splitlines(keepends=True))


def windows(n_tokens: int, max_length: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window that scores a token, for 1 <= stride <= max_length.

    Windows of `max_length` tokens start every `stride` tokens until one reaches `n_tokens`. A window scores the
    tokens at positions first..end-1 (token t predicted from the window's tokens before it): those the previous
    window did not reach, never the window's own first token. So with stride < max_length every token but the first
    is scored exactly once; with stride == max_length each window's first token is left unscored.
    """
    previous_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        first = max(previous_end, begin + 1)
        if first < end:
            yield begin, end, first
        previous_end = end
        if end == n_tokens:
            break


def perplexity(model: CausalLM, ids: list[int], stride: int | None = None, max_length: int | None = None,
               progress: Callable[[int, int], None] | None = None) -> Perplexity:
    """Perplexity of the token sequence `ids`, each window a fresh prefill from position 0; `progress` is called
    after each window with (tokens scored so far, tokens to score)."""
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
    spans = list(windows(len(ids), max_length, stride))
    total = sum(end - first for _, end, first in spans)
    nll_sum, scored = 0.0, 0
    for begin, end, first in spans:
        window = np.asarray(ids[begin:end], np.int64)[None]
        logits, _ = model.prefill(window, np.ones_like(window))
        scores = logits[0, first - begin - 1:end - begin - 1].astype(np.float64)  # position t - 1 predicts token t
        targets = window[0, first - begin:]
        top = scores.max(axis=-1)
        log_z = top + np.log(np.exp(scores - top[:, None]).sum(axis=-1))
        nll_sum += float((log_z - scores[np.arange(len(targets)), targets]).sum())
        scored += end - first
        if progress is not None:
            progress(scored, total)
    nll = nll_sum / scored
    return Perplexity(perplexity=math.exp(nll), nll=nll, tokens=scored)
