"""Text generation on a causal-LM bundle: greedy or sampled decoding with the KV cache, streaming, numpy only."""

from __future__ import annotations

import time
from collections.abc import Iterator
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
    prefill_ms: float = 0.0
    decode_ms: float = 0.0  # picking tokens and the cached steps, not the time a consumer holds a step
    decode_steps: int = 0

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
    """One prompt's new tokens and their text."""

    ids: list[int] = field(default_factory=list)
    text: str = ""
    done: bool = False


def prompt_budget(context: int, max_new_tokens: int) -> int:
    """How many prompt tokens a cut keeps: room for `max_new_tokens`, though never less than half the context."""
    return max(context - max_new_tokens, (context + 1) // 2)


def encode_prompts(tokenizer: Tokenizer, prompts: list[str], context: int, max_new_tokens: int,
                   truncate: bool, special_tokens: bool = True) -> list[list[int]]:
    """Token ids per prompt (`special_tokens`: as `encode`); a prompt that fills the context is an error, or with
    `truncate` keeps its last `prompt_budget` tokens (the tokenizer's special tokens kept). A prompt that fits is
    kept whole."""
    if not prompts:
        raise KninferError("no prompt given: pass --prompt TEXT (or --prompt - to read stdin)")
    encoded = []
    for number, prompt in enumerate(prompts, 1):
        ids = encode(tokenizer, prompt, special_tokens)
        if not prompt or not ids:  # a BOS alone is no prompt
            raise KninferError(f"prompt {number} is empty: expected some text to continue")
        if len(ids) >= context:
            if not truncate:
                raise KninferError(f"prompt {number} has {len(ids)} tokens but the model's context is {context}: "
                                   "shorten it or pass --truncate left")
            ids = encode(tokenizer, prompt, special_tokens, prompt_budget(context, max_new_tokens), side="left")
        encoded.append(ids)
    return encoded


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


def decoding(model: CausalLM, tokenizer: Tokenizer, prompts: list[str], sampling: Sampling = Sampling(),
             truncate: bool = False, special_tokens: bool = True) -> Iterator[Generation]:
    """Continue each prompt (a left-padded batch) until EOS, a stop string, max_new_tokens or the context is reached,
    yielding the Generation after each new token: one object, updated in place, complete after the last yield.
    Bad settings and prompts raise here, before the first step. `special_tokens` False: the prompts are rendered
    chat templates, which write their own."""
    sampling.check()
    prompt_ids = encode_prompts(tokenizer, prompts, model.bundle.context_length, sampling.max_new_tokens, truncate,
                                special_tokens)
    return _steps(model, tokenizer, prompt_ids, sampling)


def generate(model: CausalLM, tokenizer: Tokenizer, prompts: list[str], sampling: Sampling = Sampling(),
             truncate: bool = False, special_tokens: bool = True) -> Generation:
    """The finished Generation of `decoding`: its last yield."""
    *_, finished = decoding(model, tokenizer, prompts, sampling, truncate, special_tokens)
    return finished


class TextStream(Iterator[str]):
    """One prompt's new text as it is decoded, in pieces that can no longer change; `result` is the Generation so
    far, whole once the stream is exhausted."""

    def __init__(self, steps: Iterator[Generation], stop: tuple[str, ...]) -> None:
        self.result: Generation | None = None
        self._pieces = self._settled_pieces(steps, stop)

    def __next__(self) -> str:
        return next(self._pieces)

    def _settled_pieces(self, steps: Iterator[Generation], stop: tuple[str, ...]) -> Iterator[str]:
        """Hold back a partial UTF-8 character (U+FFFD) and a tail that begins a stop string until the end."""
        shown, text = 0, ""
        for generation in steps:
            self.result, text = generation, generation.texts[0]
            end = len(text.rstrip("\ufffd"))
            end -= max((k for s in stop for k in range(1, len(s)) if text[:end].endswith(s[:k])), default=0)
            if end > shown:
                yield text[shown:end]
                shown = end
        if len(text) > shown:
            yield text[shown:]


def _steps(model: CausalLM, tokenizer: Tokenizer, prompt_ids: list[list[int]],
           sampling: Sampling) -> Iterator[Generation]:
    bundle = model.bundle
    ids, mask = pad(prompt_ids, bundle.pad_token_id, side="left")
    rng = np.random.default_rng(sampling.seed)
    rows = [_Row() for _ in prompt_ids]
    generation = Generation(texts=[""] * len(rows), token_ids=[row.ids for row in rows],
                            prompt_tokens=sum(len(p) for p in prompt_ids))
    start = time.perf_counter()
    capacity = min(bundle.context_length, mask.shape[1] + sampling.max_new_tokens)
    logits, cache = model.prefill(ids, mask, capacity)
    generation.prefill_ms = (time.perf_counter() - start) * 1e3
    start = time.perf_counter()
    while True:
        history = [p + r.ids for p, r in zip(prompt_ids, rows, strict=True)] if sampling.repetition_penalty != 1 else []
        tokens = next_tokens(logits[:, -1], history, sampling, rng)
        for row, token in zip(rows, tokens.tolist(), strict=True):
            if not row.done:
                _append(row, token, tokenizer, bundle.eos_token_id, sampling)
        if mask.shape[1] + 1 >= bundle.context_length:  # prompt and new tokens fill the context
            for row in rows:
                row.done = True
        generation.texts = [row.text for row in rows]
        generation.decode_ms += (time.perf_counter() - start) * 1e3
        yield generation
        if all(row.done for row in rows):
            return
        start = time.perf_counter()
        # finished rows keep feeding padding, as transformers' generate() does
        feed = np.where([row.done for row in rows], bundle.pad_token_id, tokens)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((len(rows), 1), np.int64)], axis=1)
        logits, cache = model.step(feed, mask, cache)
        generation.decode_steps += 1


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
