"""Read and check an exported bundle: NAME.onnx, tokenizer.json and kninfer.json in one directory."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kninfer.errors import KninferError

FORMAT = "kninfer-bundle"
FORMAT_VERSION = 1
METADATA_FILE = "kninfer.json"
TOKENIZER_FILE = "tokenizer.json"
TASKS = ("causal-lm", "sequence-classification")
KV_KEYS = ("num_layers", "num_heads", "head_dim", "past_key", "past_value", "present_key", "present_value")


@dataclass(frozen=True)
class KVCacheSpec:
    """Layout of the past/present key-value tensors: (batch, num_heads, length, head_dim) per layer."""

    num_layers: int
    num_heads: int
    head_dim: int
    past_key: str
    past_value: str
    present_key: str
    present_value: str

    def past_names(self) -> list[str]:
        """Graph input names of the cache, in layer order, key before value."""
        return [f.format(i=i) for i in range(self.num_layers) for f in (self.past_key, self.past_value)]

    def present_names(self) -> list[str]:
        """Graph output names of the updated cache, in the same order as `past_names`."""
        return [f.format(i=i) for i in range(self.num_layers) for f in (self.present_key, self.present_value)]


@dataclass(frozen=True)
class Bundle:
    """An exported model on disk and the facts the runtime needs from its kninfer.json."""

    directory: Path
    onnx_path: Path
    tokenizer_path: Path
    task: str
    context_length: int
    eos_token_id: int
    pad_token_id: int
    labels: list[str] | None
    glue_task: str | None
    max_input_length: int  # inputs are cut here: a classifier's fine-tuning length, else the context
    kv_cache: KVCacheSpec | None
    meta: dict[str, Any]


def read_bundle(path: str | Path) -> Bundle:
    """The bundle at `path`: its directory or any file in it (usually the .onnx file)."""
    path = Path(path)
    if not path.exists():
        raise KninferError(f"bundle '{path}' does not exist: expected a bundle directory or its .onnx file")
    directory = path if path.is_dir() else path.parent
    meta_path = directory / METADATA_FILE
    if not meta_path.is_file():
        raise KninferError(f"'{meta_path}' is missing: '{path}' is not a kninfer bundle (run `kninfer export`)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise KninferError(f"'{meta_path}' is not valid JSON: {error}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise KninferError(f"'{meta_path}' has no \"format\": \"{FORMAT}\": not a kninfer bundle description")
    if meta.get("format_version") != FORMAT_VERSION:
        raise KninferError(f"'{meta_path}' has format_version {meta.get('format_version')!r}; "
                           f"this kninfer reads version {FORMAT_VERSION}")
    _require(meta, meta_path, {"onnx_file": str, "task": str, "context_length": int, "eos_token_id": int,
                               "pad_token_id": int})
    if meta.get("max_input_length") is not None:
        _require(meta, meta_path, {"max_input_length": int})
    if meta["task"] not in TASKS:
        raise KninferError(f"'{meta_path}': task {meta['task']!r} is not one of {', '.join(TASKS)}")
    onnx_path = directory / meta["onnx_file"]
    if path.is_file() and path.suffix == ".onnx" and path.name != onnx_path.name:
        raise KninferError(f"'{path}' is not the model of its bundle: kninfer.json names '{meta['onnx_file']}'")
    if not onnx_path.is_file():
        raise KninferError(f"'{onnx_path}' is missing: kninfer.json names it as the bundle's model")
    if meta.get("onnx_data_file") and not (directory / meta["onnx_data_file"]).is_file():
        raise KninferError(f"'{directory / meta['onnx_data_file']}' is missing: kninfer.json names it as the "
                           "file holding the model's weights")
    tokenizer_path = directory / TOKENIZER_FILE
    if not tokenizer_path.is_file():
        raise KninferError(f"'{tokenizer_path}' is missing: export the model with `--tokenizer DIR|tokenizer.json`")
    return Bundle(
        directory=directory,
        onnx_path=onnx_path,
        tokenizer_path=tokenizer_path,
        task=meta["task"],
        context_length=meta["context_length"],
        eos_token_id=meta["eos_token_id"],
        pad_token_id=meta["pad_token_id"],
        labels=meta.get("labels"),
        glue_task=meta.get("glue_task"),
        max_input_length=meta.get("max_input_length") or meta["context_length"],
        kv_cache=_kv_cache(meta, meta_path),
        meta=meta,
    )


def _kv_cache(meta: dict[str, Any], meta_path: Path) -> KVCacheSpec | None:
    spec = meta.get("kv_cache")
    if meta["task"] != "causal-lm":
        return None
    if not isinstance(spec, dict) or any(key not in spec for key in KV_KEYS):
        raise KninferError(f"'{meta_path}': a causal-lm bundle needs \"kv_cache\" with {', '.join(KV_KEYS)}")
    return KVCacheSpec(**{key: spec[key] for key in KV_KEYS})


def _require(meta: dict[str, Any], meta_path: Path, fields: dict[str, type]) -> None:
    for key, kind in fields.items():
        if not isinstance(meta.get(key), kind):
            raise KninferError(f"'{meta_path}': \"{key}\" is {meta.get(key)!r}, expected a {kind.__name__}")
