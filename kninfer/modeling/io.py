"""Load and save models: a Hugging Face directory, a hub name, or a kninfer `.pt` file (weights only)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

import kninfer.modeling  # noqa: F401  (registers kngpt2 with the Auto classes)
from kninfer.atomic import atomic_path, check_folder_output
from kninfer.errors import KninferError

PT_FORMAT = "kninfer"


def load(source: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerFast | None]:
    """The model and its tokenizer (None when the source has none) from a `.pt`, a directory or a hub name."""
    path = Path(source)
    if path.suffix == ".pt" or path.is_file():
        return _load_pt(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise KninferError(f"'{path}' is a directory without config.json: not a Hugging Face checkpoint")
        return _from_pretrained(str(path))
    try:
        return _from_pretrained(str(source))
    except OSError as error:
        raise KninferError(
            f"cannot load '{source}': no such file or directory, and not a reachable hub model ({error})"
        ) from None


def save(model: PreTrainedModel, out: str | Path, tokenizer: PreTrainedTokenizerFast | None = None, *,
         overwrite: bool = False) -> Path:
    """Write `model` (and its tokenizer) to `out`: a `.pt` file or a Hugging Face directory, atomically; an
    existing `out` that kninfer did not write is refused unless `overwrite` (its other files are kept)."""
    out = Path(out)
    check_output(out, overwrite)
    try:
        if out.suffix == ".pt":
            payload: dict[str, Any] = {
                "format": PT_FORMAT,
                "config": model.config.to_dict(),
                "state_dict": {k: v.detach().contiguous() for k, v in model.state_dict().items()},
            }
            if tokenizer is not None:
                payload["tokenizer"] = _tokenizer_payload(tokenizer)
            with atomic_path(out) as tmp:
                torch.save(payload, tmp)
            return out
        with atomic_path(out, directory=True, kind="checkpoint", overwrite=overwrite) as tmp:
            model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    except OSError as error:
        raise KninferError(f"cannot write '{out}': {error.strerror or error}") from None
    return out


def check_output(out: str | Path, overwrite: bool = False) -> None:
    """Raise now, before training, if `save(..., out, overwrite=overwrite)` would refuse `out`."""
    out = Path(out)
    if out.suffix != ".pt":
        check_folder_output(out, "checkpoint", overwrite)
    elif out.is_dir():
        raise KninferError(f"'{out}' is a folder: name a .pt file or a folder without the .pt suffix")
    elif out.exists() and not overwrite and not _is_checkpoint_file(out):
        raise KninferError(f"'{out}' exists and is not a kninfer checkpoint: name a new file, "
                           "or pass --overwrite to replace it")


def _is_checkpoint_file(path: Path) -> bool:
    """Whether `path` is a `.pt` that kninfer wrote (read without unpickling code)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001  anything unreadable is not ours: the caller refuses to replace it
        return False
    return isinstance(payload, dict) and payload.get("format") == PT_FORMAT


def model_class(config: Any) -> type:
    """The Auto class that builds a model with this config's architecture (causal LM or classifier)."""
    architectures = getattr(config, "architectures", None) or []
    if any(name.endswith("ForSequenceClassification") for name in architectures):
        return AutoModelForSequenceClassification
    return AutoModelForCausalLM


def _from_pretrained(name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerFast | None]:
    config = AutoConfig.from_pretrained(name)
    model = model_class(config).from_pretrained(name, config=config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return model.eval(), tokenizer


def _load_pt(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerFast | None]:
    if not path.is_file():
        raise KninferError(f"'{path}': no such file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise KninferError(
            f"'{path}' is refused: it holds pickled objects beyond tensors and plain data, "
            f"which could run code ({_first_line(error)})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise KninferError(f"'{path}' is not a readable checkpoint: {_first_line(error)}") from None
    if not isinstance(payload, dict) or payload.get("format") != PT_FORMAT:
        raise KninferError(f"'{path}' is not a kninfer checkpoint (no \"format\": \"{PT_FORMAT}\" entry)")
    config_dict = dict(payload["config"])
    config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    model = model_class(config).from_config(config)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as error:
        raise KninferError(f"'{path}': weights do not match its config: {_first_line(error)}") from None
    tokenizer = _tokenizer_from_payload(payload["tokenizer"]) if "tokenizer" in payload else None
    return model.eval(), tokenizer


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _tokenizer_payload(tokenizer: PreTrainedTokenizerFast) -> dict[str, str]:
    specials = {k: str(v) for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    return {"tokenizer_json": tokenizer.backend_tokenizer.to_str(), "special_tokens": json.dumps(specials)}


def _tokenizer_from_payload(payload: dict[str, str]) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(payload["tokenizer_json"]), **json.loads(payload["special_tokens"])
    )
