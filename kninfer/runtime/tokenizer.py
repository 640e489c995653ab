"""The bundle's tokenizer: a Hugging Face `tokenizers` JSON file, no transformers needed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from kninfer.errors import KninferError


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The fast tokenizer stored in `path` (a tokenizer.json)."""
    try:
        return Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises a bare Exception for unreadable files
        raise KninferError(f"'{path}' is not a readable tokenizer.json: {error}") from None


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of `text` exactly as written (GPT-2 adds no special tokens)."""
    return tokenizer.encode(text, add_special_tokens=False).ids


def decode(tokenizer: Tokenizer, ids: list[int]) -> str:
    """The text of `ids`, special tokens kept, so that decode(encode(text)) == text for any UTF-8 text."""
    return tokenizer.decode(ids, skip_special_tokens=False)


def pad(sequences: list[list[int]], pad_id: int, side: str) -> tuple[np.ndarray, np.ndarray]:
    """input_ids and attention_mask (batch, longest); "left" for decoding, "right" where the last token is pooled."""
    width = max(len(s) for s in sequences)
    ids = np.full((len(sequences), width), pad_id, np.int64)
    mask = np.zeros((len(sequences), width), np.int64)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, span] = seq
        mask[row, span] = 1
    return ids, mask
