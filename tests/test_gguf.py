"""Loading a GGUF file: a tiny llama written here with gguf's writer loads exactly, with the tokenizer the file
describes; damaged or unsupported files are one clear line."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf import GGUFValueType, GGUFWriter, TokenType
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

import kninfer.modeling.io as io
from kninfer.errors import KninferError
from kninfer.modeling.io import load, save

HIDDEN, HEADS, KV_HEADS, LAYERS, FFN, CONTEXT, EPS, THETA = 64, 4, 2, 2, 128, 256, 1e-5, 10000.0
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["H e", "l l", "He ll", "Hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]  # "Hello world" → Hello, Ġworld
TOKENS = SPECIALS + [bytes_to_unicode()[byte] for byte in range(256)] + [merge.replace(" ", "") for merge in MERGES]
BOS, EOS, PAD = 1, 2, 0  # no unknown token: byte-level BPE needs none
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
IDS = torch.tensor([[TOKENS.index("Hello"), TOKENS.index("Ġworld"), 40, 77, EOS, 100, 7, 250]])
# llama.cpp's names for a block's tensors, and transformers'
BLOCK = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
         "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
         "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
T = GGUFValueType


def llama_weights() -> dict[str, np.ndarray]:
    """Random weights of the tiny llama under transformers' names (tied head), seeded."""
    rng = np.random.default_rng(0)
    head_dim = HIDDEN // HEADS
    shapes = {"input_layernorm": (HIDDEN,), "self_attn.q_proj": (HIDDEN, HIDDEN),
              "self_attn.k_proj": (KV_HEADS * head_dim, HIDDEN), "self_attn.v_proj": (KV_HEADS * head_dim, HIDDEN),
              "self_attn.o_proj": (HIDDEN, HIDDEN), "post_attention_layernorm": (HIDDEN,),
              "mlp.gate_proj": (FFN, HIDDEN), "mlp.up_proj": (FFN, HIDDEN), "mlp.down_proj": (HIDDEN, FFN)}
    weights = {"model.embed_tokens.weight": rng.normal(0, 0.5, (len(TOKENS), HIDDEN)),
               "model.norm.weight": 1 + rng.normal(0, 0.1, HIDDEN)}
    for layer in range(LAYERS):
        for name, shape in shapes.items():
            norm = name.endswith("layernorm")
            weights[f"model.layers.{layer}.{name}.weight"] = (1 if norm else 0) + rng.normal(0, 0.1 if norm else 0.2,
                                                                                              shape)
    return {name: value.astype(np.float32) for name, value in weights.items()}


def permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's reordering of q/k rows for its rotary embedding (convert_hf_to_gguf.py, LlamaModel.permute)."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape)


def gguf_tensors(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The weights under llama.cpp's names, q and k permuted as llama.cpp writes them."""
    tensors = {"token_embd.weight": weights["model.embed_tokens.weight"],
               "output_norm.weight": weights["model.norm.weight"]}
    for layer in range(LAYERS):
        for gguf_name, name in BLOCK.items():
            tensor = weights[f"model.layers.{layer}.{name}.weight"]
            if gguf_name in ("attn_q", "attn_k"):
                tensor = permute(tensor, HEADS if gguf_name == "attn_q" else KV_HEADS)
            tensors[f"blk.{layer}.{gguf_name}.weight"] = tensor
    return tensors


def llama_fields() -> dict[str, tuple[Any, GGUFValueType]]:
    """The metadata of the tiny llama: its sizes and its tokenizer, which adds no BOS and ends with <|im_end|>."""
    return {
        "general.name": ("tiny llama", T.STRING),
        "llama.block_count": (LAYERS, T.UINT32), "llama.context_length": (CONTEXT, T.UINT32),
        "llama.embedding_length": (HIDDEN, T.UINT32), "llama.feed_forward_length": (FFN, T.UINT32),
        "llama.attention.head_count": (HEADS, T.UINT32), "llama.attention.head_count_kv": (KV_HEADS, T.UINT32),
        "llama.rope.freq_base": (THETA, T.FLOAT32), "llama.attention.layer_norm_rms_epsilon": (EPS, T.FLOAT32),
        "llama.rope.dimension_count": (HIDDEN // HEADS, T.UINT32), "llama.vocab_size": (len(TOKENS), T.UINT32),
        "tokenizer.ggml.model": ("gpt2", T.STRING), "tokenizer.ggml.pre": ("smollm", T.STRING),
        "tokenizer.ggml.tokens": (TOKENS, T.ARRAY),
        "tokenizer.ggml.token_type": ([TokenType.CONTROL if token in SPECIALS else TokenType.NORMAL
                                       for token in TOKENS], T.ARRAY),
        "tokenizer.ggml.merges": (MERGES, T.ARRAY),
        "tokenizer.ggml.bos_token_id": (BOS, T.UINT32), "tokenizer.ggml.eos_token_id": (EOS, T.UINT32),
        "tokenizer.ggml.padding_token_id": (PAD, T.UINT32), "tokenizer.ggml.add_bos_token": (False, T.BOOL),
        "tokenizer.chat_template": (TEMPLATE, T.STRING),
    }


def write_gguf(path: Path, architecture: str = "llama", fields: dict[str, tuple[Any, GGUFValueType]] | None = None,
               tensors: dict[str, np.ndarray | None] | None = None) -> Path:
    """Write the tiny llama as an F32 GGUF, with `fields` and `tensors` added or changed (None: left out)."""
    writer = GGUFWriter(path, architecture)
    for key, (value, kind) in {**llama_fields(), **(fields or {})}.items():
        if value is not None:
            writer.add_key_value(key, [int(v) for v in value] if key.endswith("token_type") else value, kind)
    for name, tensor in {**gguf_tensors(llama_weights()), **(tensors or {})}.items():
        if tensor is not None:
            writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def loaded(tiny_gguf):
    return load(tiny_gguf)


def reference() -> LlamaForCausalLM:
    """The tiny llama built by transformers from the same weights, never through GGUF."""
    config = LlamaConfig(vocab_size=len(TOKENS), hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=CONTEXT,
                         rms_norm_eps=EPS, rope_theta=THETA, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    weights = {name: torch.from_numpy(value) for name, value in llama_weights().items()}
    model.load_state_dict({**weights, "lm_head.weight": weights["model.embed_tokens.weight"]})
    return model


def refused(source: Path, *words: str) -> str:
    """The one-line KninferError that loading `source` raises, checked to name it and hold `words`."""
    with pytest.raises(KninferError) as error:
        load(source)
    message = str(error.value)
    assert "\n" not in message and f"'{source}'" in message and all(word in message for word in words), message
    return message


def test_a_llama_gguf_loads_exactly(loaded):
    model, _ = loaded
    with torch.no_grad():
        expected, got = reference()(IDS).logits, model(IDS).logits
    assert model.dtype == torch.float32 and torch.allclose(got, expected, atol=1e-5, rtol=0)


def test_the_tokenizer_and_config_follow_the_file(loaded):
    model, tokenizer = loaded
    assert tokenizer("Hello world").input_ids == [TOKENS.index("Hello"), TOKENS.index("Ġworld")]  # no BOS
    post_processor = json.loads(tokenizer.backend_tokenizer.to_str())["post_processor"]
    assert not any("SpecialToken" in piece for piece in post_processor["single"] + post_processor["pair"])
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|endoftext|>", None)
    assert (tokenizer.eos_token_id, tokenizer.chat_template) == (EOS, TEMPLATE)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False) == (
        "<|im_start|>user\nHi<|im_end|>\n")
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (BOS, EOS, PAD)
    assert model.generation_config.eos_token_id == EOS


def test_a_loaded_gguf_saves_and_reloads(tmp_path, loaded):
    model, tokenizer = loaded
    folder = save(model, tmp_path / "saved", tokenizer)
    assert not (folder / "tokenizer.model").exists()  # not the GGUF file copied under that name
    again, tokenizer_again = load(folder)
    assert tokenizer_again("Hello world").input_ids == tokenizer("Hello world").input_ids
    assert (tokenizer_again.eos_token, tokenizer_again.chat_template) == ("<|im_end|>", TEMPLATE)
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, model(IDS).logits)


def truncate(path: Path, fraction: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def set_array_length(path: Path, key: str, length: int) -> None:
    """Overwrite the length of metadata array `key` (after its name, value type and item type)."""
    data = bytearray(path.read_bytes())
    start = data.index(key.encode()) + len(key) + 8
    data[start:start + 8] = struct.pack("<Q", length)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("change, words", [
    pytest.param(lambda p: truncate(p, 0.9), "is a truncated or corrupt GGUF file", id="truncated-tensors"),
    pytest.param(lambda p: truncate(p, 0.02), "is a truncated or corrupt GGUF file", id="truncated-metadata"),
    # gguf's own reader loops for ever on this one: reading past the end gives it empty arrays
    pytest.param(lambda p: set_array_length(write_gguf(p, fields={"tiny.bytes": (b"kninfer", T.ARRAY)}), "tiny.bytes",
                                            2**62), "is a truncated or corrupt GGUF file", id="corrupt-array-length"),
    pytest.param(lambda p: p.write_text("not a model at all"), "is not a GGUF file", id="not-gguf"),
    pytest.param(lambda p: p.write_bytes(b""), "is not a GGUF file", id="empty"),
])
def test_damaged_files_are_one_line(tmp_path, tiny_gguf, change, words):
    path = tmp_path / "x.gguf"
    path.write_bytes(tiny_gguf.read_bytes())
    change(path)
    start = time.monotonic()
    refused(path, words)
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("architecture, fields, tensors, words", [
    pytest.param("qwen2", {}, {}, "GGUF architecture 'qwen2' is not supported: kninfer reads llama", id="qwen2"),
    pytest.param("nopeformer", {}, {}, "GGUF architecture 'nopeformer' is not supported", id="unknown"),
    pytest.param("llama", {}, {"blk.1.ffn_up.weight": None},
                 "its weights do not match its config: 1 missing (model.layers.1.mlp.up_proj.weight)", id="missing"),
    pytest.param("llama", {}, {"rope_freqs.weight": np.ones(HIDDEN // HEADS // 2, np.float32)},
                 "1 unexpected (rope_freqs.weight)", id="unexpected"),
    pytest.param("llama", {"llama.feed_forward_length": (96, T.UINT32)}, {}, "6 of the wrong shape (model.layers.0.mlp",
                 id="wrong-shape"),
    pytest.param("llama", {"llama.block_count": (10**6, T.UINT32)}, {},
                 "its config asks for 1,000,000 layers, but its weights hold only 20 tensors", id="layers-huge"),
    pytest.param("llama", {"llama.rope.scaling.type": ("linear", T.STRING)}, {},
                 "transformers would ignore its rope scaling 'linear'", id="rope-scaling"),
    pytest.param("llama", {"tokenizer.ggml.eos_token_id": (len(TOKENS), T.UINT32)}, {},
                 f"its tokenizer.ggml.eos_token_id {len(TOKENS)} is not among its {len(TOKENS)} tokens", id="eos-id"),
    pytest.param("llama", {"tokenizer.ggml.add_bos_token": (0, T.UINT32)}, {},
                 "its GGUF field tokenizer.ggml.add_bos_token must be one bool, got [0]", id="flag-type"),
    pytest.param("llama", {"llama.block_count": ("2", T.STRING)}, {},
                 'config field "num_hidden_layers" must be int, got \'2\'', id="field-type"),
])
def test_unsupported_files_are_one_line(tmp_path, architecture, fields, tensors, words):
    refused(write_gguf(tmp_path / "x.gguf", architecture, fields, tensors), words)


def test_a_missing_gguf_package_is_named(tmp_path, monkeypatch, tiny_gguf):
    monkeypatch.setattr(io, "is_gguf_available", lambda: False)
    refused(tiny_gguf, "needs the gguf package", "pip install gguf", 'pip install "kninfer[train]"')


def test_a_gguf_name_is_a_path_never_a_hub_model(monkeypatch):
    monkeypatch.setattr(io, "model_info", lambda *args, **kwargs: pytest.fail("asked the hub"))
    with pytest.raises(KninferError, match="^'nope.gguf': no such file or directory$"):
        load("nope.gguf")
