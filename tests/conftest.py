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


@pytest.fixture(scope="session")
def export_tiny(gpt2_tokenizer):
    """A function exporting a model with GPT-2's tokenizer to FOLDER/model.onnx, unverified (the tests compare);
    it returns the folder."""
    from kninfer.export.bundle import export_bundle

    def export(model, folder: Path, task: str = "causal-lm") -> Path:
        export_bundle(model, folder / "model.onnx", task=task, tokenizer_json=gpt2_tokenizer.backend_tokenizer.to_str(),
                      verify=False)
        return folder

    return export


@pytest.fixture(scope="session")
def gpt2_bundle(tmp_path_factory, tiny_teacher, export_tiny) -> Path:
    """The tiny teacher as a causal-lm bundle."""
    return export_tiny(tiny_teacher, tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="session")
def kngpt2(tiny_teacher):
    """The tiny teacher compressed with the kngpt2 preset, in eval mode."""
    from kninfer.modeling.compress import compress

    student, _ = compress(tiny_teacher, "kngpt2")
    return student.eval()


@pytest.fixture(scope="session")
def kngpt2_bundle(tmp_path_factory, kngpt2, export_tiny) -> Path:
    """The kngpt2 student as a causal-lm bundle."""
    return export_tiny(kngpt2, tmp_path_factory.mktemp("kngpt2"))


@pytest.fixture(scope="session")
def sst2_classifier(tiny_config):
    """A random tiny GPT-2 SST-2 classifier (pad = eos, as the bundle contract has it)."""
    import torch
    from transformers import GPT2ForSequenceClassification

    torch.manual_seed(1)
    config = tiny_config.__class__(**{**tiny_config.to_dict(), "num_labels": 2, "pad_token_id": 50256,
                                      "id2label": {0: "negative", 1: "positive"}})
    config.glue_task = "sst2"
    return GPT2ForSequenceClassification(config).eval()


@pytest.fixture(scope="session")
def sst2_bundle(tmp_path_factory, sst2_classifier, export_tiny) -> Path:
    """The SST-2 classifier as a sequence-classification bundle."""
    return export_tiny(sst2_classifier, tmp_path_factory.mktemp("sst2"), task="sequence-classification")


@pytest.fixture(scope="session")
def tiny_llama_config():
    """A Llama config small enough for fast tests: GQA (4 query heads, 2 KV heads), tied embeddings, no biases,
    GPT-2's vocabulary so that its real tokenizer fits."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=50257, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       tie_word_embeddings=True, bos_token_id=50256, eos_token_id=50256, rope_theta=10000.0)


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_config):
    """A random dense Llama LM (seeded), in eval mode."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config).eval()


@pytest.fixture(scope="session")
def llama_tokenizer(gpt2_tokenizer):
    """GPT-2's BPE with a post-processor that prepends BOS, as Llama tokenizers do (SmolLM2's adds none)."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(gpt2_tokenizer.backend_tokenizer.to_str())
    backend.post_processor = TemplateProcessing(single="<|endoftext|> $A", pair="<|endoftext|> $A $B",
                                                special_tokens=[("<|endoftext|>", 50256)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


@pytest.fixture(scope="session")
def text_file(tmp_path_factory, data_dir: Path) -> Path:
    """The first 6,000 characters of the State of the Union training text."""
    path = tmp_path_factory.mktemp("text") / "train.txt"
    with open(data_dir / "sotu" / "train.txt", encoding="utf-8") as handle:
        path.write_text(handle.read(6000), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def runtime_greedy():
    """A function: greedy tokens (batch, new_tokens) from a runtime CausalLM's prefill and one-token steps."""
    import numpy as np

    def greedy(lm, ids, mask, new_tokens: int):
        logits, cache = lm.prefill(ids, mask)
        tokens = []
        for _ in range(new_tokens):
            tokens.append(logits[:, -1].argmax(-1)[:, None])
            mask = np.concatenate([mask, np.ones_like(tokens[-1])], axis=1)
            logits, cache = lm.step(tokens[-1], mask, cache)
        return np.concatenate(tokens, axis=1)

    return greedy
