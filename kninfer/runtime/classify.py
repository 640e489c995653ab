"""Sentence and sentence-pair classification with a sequence-classification bundle, numpy only."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from kninfer.errors import KninferError
from kninfer.runtime.session import Classifier
from kninfer.runtime.tasks import input_text
from kninfer.runtime.tokenizer import encode, pad


@dataclass(frozen=True)
class Prediction:
    """One input's label and its probability; a regression model's (one output) has no label, its value as score."""

    label: str | None
    score: float


def encode_inputs(tokenizer: Tokenizer, inputs: list[tuple[str, ...]], max_length: int) -> list[list[int]]:
    """Token ids per input with the tokenizer's special tokens, the text cut on the right to fit `max_length` with
    them (as fine-tuning's `tokenizer(text, truncation=True, max_length=...)`)."""
    encoded = []
    for number, texts in enumerate(inputs, 1):
        if not 1 <= len(texts) <= 2:
            raise KninferError(f"input {number} has {len(texts)} texts: expected a sentence or a pair")
        text = input_text(texts)
        ids = encode(tokenizer, text, max_length=max_length)
        if not text or not ids:  # a BOS alone is no text
            raise KninferError(f"input {number} is empty: expected some text to classify")
        encoded.append(ids)
    return encoded


def classify(model: Classifier, tokenizer: Tokenizer, inputs: list[tuple[str, ...]], batch_size: int = 16,
             progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Logits (len(inputs), num_labels); inputs of similar length share a batch to pad little. `progress` is
    called after each batch with (inputs done, inputs)."""
    encoded = encode_inputs(tokenizer, inputs, model.bundle.max_input_length)
    order = np.argsort([len(ids) for ids in encoded], kind="stable")
    logits: np.ndarray | None = None
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = model.forward(*pad([encoded[i] for i in chunk], model.bundle.pad_token_id, side="right"))
        if logits is None:
            logits = np.empty((len(encoded), batch.shape[-1]), np.float32)
        logits[chunk] = batch
        if progress is not None:
            progress(start + len(chunk), len(order))
    return logits


def predictions(logits: np.ndarray, labels: list[str] | None) -> list[Prediction]:
    """Per row of logits: the argmax label and its softmax probability; one output (transformers' rule for
    regression) or no labels: the output itself."""
    if labels is None or logits.shape[-1] == 1:
        return [Prediction(None, score) for score in logits[:, 0].tolist()]
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    ids = logits.argmax(axis=-1)
    chosen = probs[np.arange(len(ids)), ids]
    return [Prediction(labels[i], p) for i, p in zip(ids.tolist(), chosen.tolist(), strict=True)]
