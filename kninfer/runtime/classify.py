"""Sentence and sentence-pair classification with a sequence-classification bundle, numpy only."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from tokenizers import Tokenizer

from kninfer.errors import KninferError
from kninfer.runtime.session import Classifier
from kninfer.runtime.tasks import input_text
from kninfer.runtime.tokenizer import encode, pad


def encode_inputs(tokenizer: Tokenizer, inputs: list[tuple[str, ...]], max_length: int) -> list[list[int]]:
    """Token ids per input, cut on the right at `max_length` (as fine-tuning's `truncation=True`)."""
    encoded = []
    for number, texts in enumerate(inputs, 1):
        if not 1 <= len(texts) <= 2:
            raise KninferError(f"input {number} has {len(texts)} texts: expected a sentence or a pair")
        ids = encode(tokenizer, input_text(texts))[:max_length]
        if not ids:
            raise KninferError(f"input {number} is empty: expected some text to classify")
        encoded.append(ids)
    return encoded


def classify(model: Classifier, tokenizer: Tokenizer, inputs: list[tuple[str, ...]], batch_size: int = 16,
             on_batch: Callable[[int], None] | None = None) -> np.ndarray:
    """Logits (len(inputs), num_labels); inputs of similar length share a batch to pad little."""
    encoded = encode_inputs(tokenizer, inputs, model.bundle.max_input_length)
    order = np.argsort([len(ids) for ids in encoded], kind="stable")
    logits: np.ndarray | None = None
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = model.forward(*pad([encoded[i] for i in chunk], model.bundle.pad_token_id, side="right"))
        if logits is None:
            logits = np.empty((len(encoded), batch.shape[-1]), np.float32)
        logits[chunk] = batch
        if on_batch is not None:
            on_batch(len(chunk))
    return logits


def predict(model: Classifier, logits: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Predicted class ids (argmax) or regression scores, and the same as text: label names or numbers."""
    labels = model.bundle.labels
    if labels is None:
        scores = logits[:, 0]
        return scores, [f"{score:.4f}" for score in scores.tolist()]
    if logits.shape[-1] != len(labels):
        raise KninferError(f"'{model.bundle.onnx_path}' returns {logits.shape[-1]} logits but kninfer.json lists "
                           f"{len(labels)} labels")
    ids = logits.argmax(axis=-1)
    return ids, [labels[i] for i in ids.tolist()]
