"""Language-model text from local files or the Hugging Face hub, tokenised and grouped into fixed-length blocks."""

from __future__ import annotations

import codecs
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, load_dataset

from kninfer.errors import KninferError

TEXT_SUFFIXES = (".txt", ".raw")


def load_lm_text(source: str, split: str = "train") -> Dataset:
    """Rows of text (column "text"): a .txt/.raw file, a folder holding `*{split}*` text files, or `hub:config`."""
    path = Path(source)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in TEXT_SUFFIXES and split in p.name)
        if not files:
            raise KninferError(f"'{path}' holds no {'/'.join(TEXT_SUFFIXES)} file with '{split}' in its name")
    elif path.suffix in TEXT_SUFFIXES or source.startswith((".", "/")):
        raise KninferError(f"'{source}': no such file or directory")
    else:
        name, _, config = source.partition(":")
        try:
            return load_dataset(name, config or None, split=split)
        except Exception as error:  # the hub raises many types: unreachable, unknown name, unknown config
            raise KninferError(f"cannot load dataset '{source}' from the hub: {str(error).splitlines()[0]}") from None
    for file in files:
        _check_text_file(file)
    return load_dataset("text", data_files=[str(f) for f in files], split="train", keep_linebreaks=True)


def _check_text_file(path: Path) -> None:
    """Refuse an empty or non-UTF-8 file now: the datasets text loader fails on it with a traceback."""
    if path.stat().st_size == 0:
        raise KninferError(f"'{path}' is empty: expected some text")
    decoder = codecs.getincrementaldecoder("utf-8")()
    with path.open("rb") as handle:
        try:
            for chunk in iter(lambda: handle.read(1 << 24), b""):
                decoder.decode(chunk)
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as error:
            raise KninferError(f"'{path}' is not UTF-8 text ({error.reason})") from None


def lm_blocks(
    dataset: Dataset, tokenizer: Any, block_size: int, max_samples: int | None = None, fraction: float | None = None
) -> Dataset:
    """Token blocks of `block_size` (input_ids, attention_mask, labels), as transformers' run_clm groups them."""
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise KninferError(f"--fraction must be in (0, 1], got {fraction}")
        dataset = dataset.select(range(max(1, int(len(dataset) * fraction))))
    column = "text" if "text" in dataset.column_names else dataset.column_names[0]

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        return {"input_ids": tokenizer(batch[column], verbose=False)["input_ids"]}

    def group(batch: dict[str, list]) -> dict[str, list]:
        ids = list(chain.from_iterable(batch["input_ids"]))
        usable = len(ids) // block_size * block_size
        blocks = [ids[i : i + block_size] for i in range(0, usable, block_size)]
        return {"input_ids": blocks, "attention_mask": [[1] * block_size for _ in blocks], "labels": blocks}

    tokens = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names, desc="tokenising")
    blocks = tokens.map(group, batched=True, batch_size=1000, desc=f"grouping into blocks of {block_size}")
    if len(blocks) == 0:
        raise KninferError(f"the text is shorter than one block of {block_size} tokens")
    if max_samples is not None:
        blocks = blocks.select(range(min(max_samples, len(blocks))))
    return blocks


def calibration_ids(source: str, tokenizer: Any, tokens: int, block_size: int) -> torch.Tensor:
    """About `tokens` token ids of `source` (as --data reads it, train split) as (N, block_size) calibration blocks."""
    blocks = lm_blocks(load_lm_text(source, "train"), tokenizer, block_size, max(1, tokens // block_size))
    return torch.tensor(blocks["input_ids"])
