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


def encode(tokenizer: Tokenizer, text: str, special_tokens: bool = True, max_length: int | None = None,
           side: str = "right") -> list[int]:
    """Token ids of `text` as transformers' `tokenizer(text)` gives them.

    With `special_tokens` the tokenizer.json's post-processor adds its own: a BOS for Llama's TemplateProcessing,
    nothing for GPT-2's ByteLevel. Text rendered from a chat template writes its own and is encoded without them
    (as `apply_chat_template(tokenize=True)` does). `max_length` cuts the text on `side` ("right" or "left") so that
    it fits together with the special tokens, which are kept (transformers' `truncation=True`).
    """
    if max_length is None:
        return tokenizer.encode(text, add_special_tokens=special_tokens).ids
    encoding = tokenizer.encode(text, add_special_tokens=False)
    added = tokenizer.num_special_tokens_to_add(is_pair=False) if special_tokens else 0
    encoding.truncate(max(max_length - added, 0), direction=side)
    return tokenizer.post_process(encoding, add_special_tokens=special_tokens).ids


def decode(tokenizer: Tokenizer, ids: list[int]) -> str:
    """The text of `ids`, special tokens kept, so that decode(encode(text, special_tokens=False)) == text for any
    UTF-8 text."""
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
