"""Shared fixtures: tiny random GPT-2 models (nothing downloaded) and the offline data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The offline data folder: $KNINFER_DATA, else ../shared/data beside the checkout."""
    path = Path(os.environ.get("KNINFER_DATA", REPO.parent / "shared" / "data"))
    if not (path / "gpt2-tokenizer" / "vocab.json").is_file():
        pytest.fail(f"test data not found at {path}: set KNINFER_DATA to the shared data folder")
    return path


@pytest.fixture(scope="session")
def gpt2_tokenizer(data_dir: Path):
    """The real GPT-2 byte-level BPE tokenizer, from local files."""
    from transformers import GPT2TokenizerFast

    folder = data_dir / "gpt2-tokenizer"
    return GPT2TokenizerFast(vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt"))


@pytest.fixture(scope="session")
def tiny_config():
    """A GPT-2 config small enough for fast tests, with GPT-2's real vocabulary."""
    from transformers import GPT2Config

    return GPT2Config(vocab_size=50257, n_positions=128, n_embd=32, n_layer=4, n_head=4)


@pytest.fixture(scope="session")
def tiny_teacher(tiny_config):
    """A random dense GPT-2 LM (seeded), in eval mode."""
    import torch
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(tiny_config).eval()


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, tiny_teacher, gpt2_tokenizer) -> Path:
    """The tiny teacher saved as a Hugging Face directory with its tokenizer."""
    path = tmp_path_factory.mktemp("teacher")
    tiny_teacher.save_pretrained(path)
    gpt2_tokenizer.save_pretrained(path)
    return path
