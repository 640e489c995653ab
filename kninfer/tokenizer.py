"""The bundle's tokenizer: a Hugging Face `tokenizers` JSON file, no transformers needed."""

from __future__ import annotations

from pathlib import Path

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
