"""Text generation on a causal-LM bundle: greedy or sampled decoding with the KV cache, numpy only."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from tokenizers import Tokenizer

from kninfer.errors import KninferError
from kninfer.runtime.session import CausalLM
from kninfer.runtime.tokenizer import decode, encode, pad


@dataclass(frozen=True)
class Sampling:
    """How to pick each next token; temperature 0 is greedy decoding."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def check(self) -> None:
        """Reject settings that have no meaning, naming the option."""
        for name, ok, expected in (
            ("max-new-tokens", self.max_new_tokens >= 1, "1 or more"),
            ("temperature", self.temperature >= 0, "0 (greedy) or more"),
            ("top-k", self.top_k >= 0, "0 (off) or more"),
            ("top-p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("repetition-penalty", self.repetition_penalty > 0, "above 0 (1 is off)"),
        ):
            if not ok:
                raise KninferError(f"--{name} is {getattr(self, name.replace('-', '_'))}: expected {expected}")
        if any(not s for s in self.stop):
            raise KninferError("--stop is an empty string: expected some text to stop at")


@dataclass
class Generation:
    """New tokens and text per prompt, and the timings of the run."""

    texts: list[str]
    token_ids: list[list[int]]
    prompt_tokens: int
    prefill_ms: float
    decode_ms: float
    decode_steps: int

    @property
    def new_tokens(self) -> int:
        """New tokens over all prompts."""
        return sum(len(ids) for ids in self.token_ids)

    def summary(self) -> str:
        """One line: prompt tokens, new tokens, prefill ms, ms/token, tokens/s."""
        ms_per_token = self.decode_ms / max(self.decode_steps, 1)
        tokens_per_s = self.new_tokens / max((self.prefill_ms + self.decode_ms) / 1e3, 1e-9)
        return (f"prompt {self.prompt_tokens} tokens, {self.new_tokens} new tokens, prefill {self.prefill_ms:.1f} ms, "
                f"{ms_per_token:.2f} ms/token, {tokens_per_s:.1f} tokens/s")


@dataclass
class _Row:
    """One prompt's new tokens, their text, and how much of it was already streamed."""

    ids: list[int] = field(default_factory=list)
    text: str = ""
    streamed: int = 0
    done: bool = False


def encode_prompts(tokenizer: Tokenizer, prompts: list[str], context: int, max_new_tokens: int,
                   truncate: bool) -> list[list[int]]:
    """Token ids per prompt; a prompt that fills the context is an error, or with `truncate` keeps its last tokens:
    room for `max_new_tokens`, though never less than half the context. A prompt that fits is kept whole."""
    if not prompts:
        raise KninferError("no prompt given: pass --prompt TEXT (or --prompt - to read stdin)")
    encoded = []
    for number, prompt in enumerate(prompts, 1):
        ids = encode(tokenizer, prompt)
        if not ids:
            raise KninferError(f"prompt {number} is empty: expected some text to continue")
        if len(ids) >= context:
            if not truncate:
                raise KninferError(f"prompt {number} has {len(ids)} tokens but the model's context is {context}: "
                                   "shorten it or pass --truncate left")
            ids = ids[-max(context - max_new_tokens, (context + 1) // 2):]
        encoded.append(ids)
    return encoded


def position_ids(mask: np.ndarray, length: int) -> np.ndarray:
    """The last `length` positions, as transformers' generate() builds them: cumsum(mask) - 1, padding at 1."""
    positions = np.cumsum(mask, axis=1) - 1
    positions[mask == 0] = 1
    return positions[:, -length:]


def next_tokens(logits: np.ndarray, history: list[list[int]], sampling: Sampling,
                rng: np.random.Generator) -> np.ndarray:
    """One token per row from last-position logits (batch, vocab), in transformers' processor order."""
    logits = logits.astype(np.float64)
    if sampling.repetition_penalty != 1.0:
        for row, seen in enumerate(history):
            seen = np.unique(seen)
            scores = logits[row, seen]
            logits[row, seen] = np.where(scores < 0, scores * sampling.repetition_penalty,
                                         scores / sampling.repetition_penalty)
    if sampling.temperature == 0:
        return logits.argmax(axis=-1)
    logits /= sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        kth = np.partition(logits, -sampling.top_k, axis=-1)[:, -sampling.top_k, None]
        logits[logits < kth] = -np.inf
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if sampling.top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        # keep the smallest head of the sorted list whose mass reaches top_p (always at least one token)
        drop_sorted = np.cumsum(sorted_probs, axis=-1) - sorted_probs >= sampling.top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        probs[drop] = 0.0
        probs /= probs.sum(axis=-1, keepdims=True)
    draws = rng.random((len(probs), 1))
    return np.minimum((np.cumsum(probs, axis=-1) < draws).sum(axis=-1), probs.shape[-1] - 1)


def generate(model: CausalLM, tokenizer: Tokenizer, prompts: list[str], sampling: Sampling = Sampling(),
             truncate: bool = False, on_text: Callable[[str], None] | None = None) -> Generation:
    """Continue each prompt until EOS, a stop string, max_new_tokens or the context is reached.

    `on_text` receives the first prompt's new text piece by piece as it is decoded (for streaming).
    """
    sampling.check()
    bundle = model.bundle
    prompt_ids = encode_prompts(tokenizer, prompts, bundle.context_length, sampling.max_new_tokens, truncate)
    ids, mask = pad(prompt_ids, bundle.pad_token_id, side="left")
    rng = np.random.default_rng(sampling.seed)
    rows = [_Row() for _ in prompts]

    start = time.perf_counter()
    logits, cache = model.forward(ids, mask, position_ids(mask, ids.shape[1]), model.empty_cache(len(prompts)))
    prefill_done = time.perf_counter()
    steps = 0
    while True:
        history = [p + r.ids for p, r in zip(prompt_ids, rows, strict=True)] if sampling.repetition_penalty != 1 else []
        tokens = next_tokens(logits[:, -1], history, sampling, rng)
        for row, token in zip(rows, tokens.tolist(), strict=True):
            if not row.done:
                _append(row, token, tokenizer, bundle.eos_token_id, sampling)
        if mask.shape[1] + 1 >= bundle.context_length:  # prompt and new tokens fill the context
            for row in rows:
                row.done = True
        if on_text is not None:
            _stream(rows[0], sampling.stop, on_text)
        if all(row.done for row in rows):
            break
        # finished rows keep feeding padding, as transformers' generate() does
        feed = np.where([row.done for row in rows], bundle.pad_token_id, tokens)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((len(rows), 1), np.int64)], axis=1)
        logits, cache = model.forward(feed, mask, position_ids(mask, 1), cache)
        steps += 1
    end = time.perf_counter()
    return Generation(texts=[row.text for row in rows], token_ids=[row.ids for row in rows],
                      prompt_tokens=sum(len(p) for p in prompt_ids), prefill_ms=(prefill_done - start) * 1e3,
                      decode_ms=(end - prefill_done) * 1e3, decode_steps=steps)


def _append(row: _Row, token: int, tokenizer: Tokenizer, eos_id: int, sampling: Sampling) -> None:
    """Add a token to the row's output, ending it at EOS or at the first stop string."""
    if token == eos_id:
        row.done = True
        return
    row.ids.append(token)
    row.text = decode(tokenizer, row.ids)
    hits = [i for i in (row.text.find(s) for s in sampling.stop) if i >= 0]
    if hits:
        row.text, row.done = row.text[:min(hits)], True
    elif len(row.ids) >= sampling.max_new_tokens:
        row.done = True


def _stream(row: _Row, stop: tuple[str, ...], on_text: Callable[[str], None]) -> None:
    """Hand over the text that can no longer change: not a partial UTF-8 character, nor a stop string's start."""
    end = len(row.text)
    if not row.done:
        end = len(row.text.rstrip("\ufffd"))
        held = max((k for s in stop for k in range(1, len(s)) if row.text[:end].endswith(s[:k])), default=0)
        end -= held
    if end > row.streamed:
        on_text(row.text[row.streamed:end])
        row.streamed = end
