"""Load and save models: a Hugging Face directory, a hub name, or a kninfer `.pt` file (weights only); load a GGUF
file too."""

from __future__ import annotations

import copy
import json
import logging
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr
from io import StringIO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import model_info
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, RepositoryNotFoundError
from huggingface_hub.utils import validate_repo_id
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
    AutoTokenizer,
    GenerationConfig,
    LlamaTokenizerFast,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint, read_field
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.utils import cached_file, is_gguf_available
from transformers.utils.hub import get_checkpoint_shard_files

import kninfer.modeling  # noqa: F401  (registers kngpt2 with the Auto classes)
from kninfer.atomic import atomic_path, check_folder_output
from kninfer.errors import KninferError

PT_FORMAT = "kninfer"
# names with these suffixes are paths, never hub models
FILE_SUFFIXES = (".pt", ".safetensors", ".json", ".onnx", ".bin", ".gguf")
NOT_CHECKPOINTS = {
    ".onnx": "is an ONNX graph: pass a checkpoint, or use `kninfer generate` for bundles",
    ".safetensors": "is a bare weights file: pass the Hugging Face directory that holds it and its config.json",
}
SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt")
NULLABLE_SUFFIX = "_token_id"  # token ids default to GPT-2's but may be null
# fields whose default is null: null, or of this type
NULL_DEFAULT_TYPES = {"architectures": list, "n_inner": int, "pad_token_id": int, "dtype": str, "torch_dtype": str}
HUB_TIMEOUT_S = 10
# the GGUF architectures kninfer reads, and the tokenizer transformers converts each one's vocabulary to: the fixes in
# _gguf_tokenizer are checked for this one
GGUF_TOKENIZERS = {"llama": LlamaTokenizerFast}
GGUF_MAGIC = b"GGUF"
GGUF_TOKENIZER_FIELDS = {"add_bos_token": bool, "add_eos_token": bool, "bos_token_id": int, "eos_token_id": int,
                         "padding_token_id": int, "unknown_token_id": int}  # under tokenizer.ggml.
GGUF_SPECIAL_TOKENS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "pad_token": "padding_token_id",
                       "unk_token": "unknown_token_id"}
GGUF_CONFIG_IDS = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "pad_token_id": "padding_token_id"}


def load(source: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerFast | None]:
    """The model and its tokenizer (None when the source has none) from a `.pt`, a `.gguf`, a directory or a hub
    name."""
    path = Path(source)
    if path.is_file():
        return _load_gguf(path) if path.suffix == ".gguf" else _load_pt(path)
    name, local_only = _locate(str(source))
    return _from_pretrained(name, local_only), _pretrained_tokenizer(name, local_only)


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
    if out.suffix in (".gguf", ".onnx", ".safetensors"):
        raise KninferError(f"'{out}': kninfer saves checkpoints as a folder or a .pt file, not {out.suffix} "
                           "(`kninfer export` writes ONNX)")
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


def is_classifier(model_or_config: PreTrainedModel | PretrainedConfig) -> bool:
    """Whether this is a sequence classifier: a model by its class, a config by the architectures it names."""
    if isinstance(model_or_config, PreTrainedModel):
        names = [type(model_or_config).__name__]
    else:
        names = getattr(model_or_config, "architectures", None) or []
    return any(name.endswith("ForSequenceClassification") for name in names)


def model_class(config: Any) -> type[PreTrainedModel]:
    """The class that builds a model with this config's architecture (causal LM or classifier)."""
    classifier = is_classifier(config)
    mapping = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING if classifier else MODEL_FOR_CAUSAL_LM_MAPPING
    try:
        return mapping[type(config)]
    except KeyError:
        kind = "sequence classifier" if classifier else "causal language model"
        raise KninferError(f"transformers has no {kind} for model_type '{config.model_type}'") from None


def _locate(name: str) -> tuple[str, bool]:
    """`name` as from_pretrained takes it, and whether only local files may be read (a directory, or no hub)."""
    if Path(name).is_dir():
        return name, True
    if _looks_local(name):
        raise KninferError(f"'{name}': no such file or directory")
    reason = _hub_unavailable(name)
    if reason is None:
        return name, False
    with _quiet_libraries():
        cached = cached_file(name, "config.json", local_files_only=True, _raise_exceptions_for_missing_entries=False)
    if cached is None:
        raise KninferError(f"cannot load '{name}': no such file or directory, not in the hub cache, and {reason}")
    return name, True


def _looks_local(name: str) -> bool:
    """Whether `name` can only be a path: a file suffix, or not a valid hub id (`./x`, `/x`, `x/`, `a/b/c`)."""
    if name.endswith(FILE_SUFFIXES):
        return True
    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def _hub_unavailable(name: str) -> str | None:
    """Why the hub cannot be asked for `name` (offline mode, no network), or None; raises if it has no such model."""
    if hub_constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:  # one request: from_pretrained would retry an unreachable hub for 20 s, logging every attempt
        model_info(name, timeout=HUB_TIMEOUT_S)
    except RepositoryNotFoundError:
        raise KninferError(f"'{name}': no such file or directory, and no such model on the Hugging Face hub") from None
    except HfHubHTTPError as error:
        return f"the Hugging Face hub failed ({_first_line(error)})"
    except OSError:  # no network, a timeout or offline mode: requests' errors and huggingface_hub's are OSErrors
        return "the Hugging Face hub is unreachable (no network?)"
    return None


def _from_pretrained(name: str, local_only: bool) -> PreTrainedModel:
    """The model of a Hugging Face directory or hub name, from safetensors weights only."""
    if Path(name).is_dir():
        _check_directory(Path(name))
    config = _config(_read_config(name, local_only), name)
    with _loading_errors(name):
        return _build_model(config, _safetensors_shapes(name, local_only), pretrained_model_name_or_path=name,
                            use_safetensors=True, local_files_only=local_only)


def _read_config(name: str, local_only: bool) -> Any:
    """The parsed config.json of a directory or hub model."""
    try:
        with _quiet_libraries():
            config_file = cached_file(name, "config.json", local_files_only=local_only)
    except OSError as error:
        raise KninferError(f"'{name}': cannot read its config.json: {_first_line(error)}") from None
    try:
        return json.loads(Path(config_file).read_text())
    except (ValueError, RecursionError) as error:  # bad UTF-8 or JSON, a 5000-digit number, [[[[... nested too deep
        raise KninferError(f"'{name}': config.json is not valid JSON: {_first_line(error)}") from None


def _safetensors_shapes(name: str, local_only: bool) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor in a model's safetensors weights (one file or shards), read from their headers."""
    with _quiet_libraries():
        single = cached_file(name, SAFE_WEIGHTS[0], local_files_only=local_only,
                             _raise_exceptions_for_missing_entries=False)
        if single is None:
            index = cached_file(name, SAFE_WEIGHTS[1], local_files_only=local_only)
            files, _ = get_checkpoint_shard_files(name, index, local_files_only=local_only)
    shapes = {}
    for file in [single] if single else files:
        with safe_open(file, "pt") as weights:
            shapes.update((key, tuple(weights.get_slice(key).get_shape())) for key in weights.keys())  # noqa: SIM118
    return shapes


def _check_directory(path: Path) -> None:
    """Raise unless `path` holds a config.json and safetensors weights (pickled weights are refused)."""
    if not (path / "config.json").is_file():
        raise KninferError(f"'{path}' is a directory without config.json: not a Hugging Face checkpoint")
    if any((path / name).is_file() for name in SAFE_WEIGHTS):
        return
    if any((path / name).is_file() for name in PICKLED_WEIGHTS):
        raise KninferError(
            f"'{path}' holds pickled weights (pytorch_model.bin), refused: unpickling could run code; "
            "convert them to model.safetensors where you trust them"
        )
    raise KninferError(f"'{path}' holds no weights: no model.safetensors beside its config.json")


def _config(config_dict: Any, source: str) -> PretrainedConfig:
    """The config `config_dict` describes, refused when transformers would need the checkpoint's own code."""
    if not isinstance(config_dict, dict):
        raise KninferError(f"'{source}': the config is not a JSON object")
    if "auto_map" in config_dict:
        raise KninferError(f"'{source}' is refused: its config asks to run the checkpoint's own code (auto_map)")
    model_type = config_dict.get("model_type")
    if not isinstance(model_type, str):
        raise KninferError(f"'{source}': the config has no model_type")
    if model_type not in CONFIG_MAPPING:
        raise KninferError(
            f"'{source}' is refused: transformers does not know model_type '{model_type}', "
            "and kninfer never runs a checkpoint's own code"
        )
    config_class = CONFIG_MAPPING[model_type]
    _check_field_types(config_dict, config_class().to_dict(), source)
    try:
        return config_class.from_dict(config_dict)
    except KninferError as error:
        raise KninferError(f"'{source}': {error}") from None
    except (TypeError, ValueError, AttributeError, KeyError) as error:  # what a config's __init__ raises on bad values
        raise KninferError(f"'{source}': invalid config: {_first_line(error)}") from None


def _check_field_types(config_dict: dict[str, Any], defaults: dict[str, Any], source: str) -> None:
    """Raise unless every field keeps the JSON type of its default (fields without one are not checked)."""
    for key, value in config_dict.items():
        default = defaults.get(key)
        expected = type(default) if default is not None else NULL_DEFAULT_TYPES.get(key)
        nullable = default is None or key.endswith(NULLABLE_SUFFIX)
        if expected is None or (value is None and nullable) or _same_json_type(value, expected):
            continue
        wanted = f"{expected.__name__} or null" if nullable else expected.__name__
        raise KninferError(f"'{source}': config field \"{key}\" must be {wanted}, got {value!r:.60}")


def _same_json_type(value: Any, expected: type) -> bool:
    """Whether `value` has the JSON type of `expected`: bool, int, float (ints too), str, list or dict."""
    if expected is bool or isinstance(value, bool):
        return expected is bool and isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float))
    return isinstance(value, expected)


def _build_model(config: PretrainedConfig, held: dict[str, tuple[int, ...]], **weights: Any) -> PreTrainedModel:
    """The model `config` describes, loaded by from_pretrained(**weights) once the weights' shapes `held` fit it."""
    architecture = model_class(config)
    _check_fits(_empty_model(architecture, config, len(held)), held)
    with _quiet_libraries():
        model, info = architecture.from_pretrained(config=config, output_loading_info=True, **weights)
    _check_keys(info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"])
    return model.eval()


def _empty_model(architecture: type[PreTrainedModel], config: PretrainedConfig, tensors: int) -> nn.Module:
    """The model `config` describes on the meta device (no memory), unless it has more layers than `tensors`."""
    layers = getattr(config, "num_hidden_layers", 0)
    if layers > tensors:  # even empty, 10⁹ layers would take forever to build
        raise KninferError(f"its config asks for {layers:,} layers, but its weights hold only {tensors} tensors")
    with torch.device("meta"), _quiet_libraries():
        return architecture(copy.deepcopy(config))  # a copy: building a model settles fields of its config


def _check_fits(model: nn.Module, held: dict[str, tuple[int, ...]]) -> None:
    """Raise unless the weights' shapes `held` give every tensor of `model` (tied ones once) in its shape."""
    # from_pretrained would make up the others from the config: terabytes for a config that asks for n_embd 10⁹
    expected = model.state_dict(keep_vars=True)
    found = {_model_key(key, expected, model.base_model_prefix): shape for key, shape in held.items()}
    first_names: dict[int, str] = {}
    for key, tensor in expected.items():
        first_names.setdefault(id(tensor), key)
    missing = [key for key in first_names.values() if key not in found]
    wrong = [key for key, shape in found.items() if key in expected and tuple(expected[key].shape) != shape]
    if missing or wrong:
        _check_keys(missing, [key for key in found if key not in expected], wrong)


def _model_key(key: str, expected: dict[str, Any], prefix: str) -> str:
    """`key` as the model names it: like transformers, add or drop the base model's prefix (`transformer.`)."""
    return next((name for name in (key, f"{prefix}.{key}", key.removeprefix(f"{prefix}.")) if name in expected), key)


def _check_keys(missing: list, unexpected: list, wrong_shape: list) -> None:
    """Raise when a weight is missing, unexpected or of the wrong shape: transformers only warns and initialises it."""
    kinds = {"missing": missing, "unexpected": unexpected, "of the wrong shape": wrong_shape}
    problems = [_listed(kind, keys) for kind, keys in kinds.items() if keys]
    if problems:
        raise KninferError(f"its weights do not match its config: {'; '.join(problems)}")


def _listed(kind: str, keys: list) -> str:
    """'5 missing (a, b, c, ...)': the count and the first three names."""
    shown = ", ".join(str(key) for key in keys[:3])
    return f"{len(keys)} {kind} ({shown}{', ...' if len(keys) > 3 else ''})"


@contextmanager
def _loading_errors(source: str) -> Iterator[None]:
    """Turn what reading weights and building a model from a config raise into one line naming `source`."""
    try:
        yield
    except KninferError as error:
        raise KninferError(f"'{source}': {error}") from None
    except SafetensorError as error:
        raise KninferError(f"'{source}': its weights file is corrupt: {_first_line(error)}") from None
    except OSError as error:
        raise KninferError(f"'{source}': cannot read its weights: {_first_line(error)}") from None
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError, ZeroDivisionError, OverflowError) as error:
        # a config transformers accepts can still fail to build a model: an unknown activation, a negative width,
        # heads that do not divide it; the modules raise whatever their arithmetic does
        detail = f"{type(error).__name__}: {_first_line(error)}"
        raise KninferError(f"'{source}': cannot build a model from its config ({detail})") from None


@contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Silence the libraries' logged and Python warnings (hub retries, weights 'newly initialized'): we raise."""
    loggers = [logging.getLogger(name) for name in ("transformers", "huggingface_hub")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _pretrained_tokenizer(name: str, local_only: bool) -> PreTrainedTokenizerFast | None:
    """The tokenizer beside a model (None when it has no tokenizer files); unreadable files are an error."""
    try:
        with _quiet_libraries():
            if not any(cached_file(name, file, local_files_only=local_only, _raise_exceptions_for_missing_entries=False)
                       for file in TOKENIZER_FILES):
                return None
            return AutoTokenizer.from_pretrained(name, local_files_only=local_only, trust_remote_code=False)
    except Exception as error:  # tokenizers raises bare Exception for a corrupt file, transformers many types
        raise KninferError(f"'{name}': its tokenizer files are unreadable: {_first_line(error)}") from None


def _load_pt(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerFast | None]:
    """The model and tokenizer of a kninfer `.pt`."""
    payload = _read_pt(path)
    config = _config(_entry(payload, "config", dict, path), str(path))
    state = _entry(payload, "state_dict", dict, path)
    if not all(isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()):
        raise KninferError(f"'{path}': its \"state_dict\" must map names to tensors")
    with _loading_errors(str(path)):
        shapes = {key: tuple(value.shape) for key, value in state.items()}
        model = _build_model(config, shapes, pretrained_model_name_or_path=None, state_dict=state)
    tokenizer = _tokenizer_from_payload(payload["tokenizer"], path) if "tokenizer" in payload else None
    return model, tokenizer


def _load_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerFast | None]:
    """The model (weights dequantised to fp32) and tokenizer of a GGUF file, read by transformers, with the special
    tokens, BOS/EOS flags and chat template that the file gives."""
    reader = _read_gguf(path)
    architecture = _gguf_field(reader, "general.architecture", str, path)
    if architecture not in GGUF_TOKENIZERS:
        raise KninferError(f"'{path}': GGUF architecture {architecture!r} is not supported: kninfer reads "
                           f"{', '.join(GGUF_TOKENIZERS)} GGUF files")
    scaling = _gguf_field(reader, f"{architecture}.rope.scaling.type", str, path)
    if scaling not in (None, "none"):
        raise KninferError(f"'{path}' is refused: transformers would ignore its rope scaling '{scaling}'")
    fields = _gguf_tokenizer_fields(reader, path)
    config_dict = _gguf_config(path)
    if config_dict.get("model_type") != architecture:  # a llama file named "mistral" is read as mistral
        raise KninferError(f"'{path}': transformers reads it as model_type {config_dict.get('model_type')!r}, "
                           f"which kninfer does not read from GGUF")
    config_dict.update({key: fields[field] for key, field in GGUF_CONFIG_IDS.items()})
    config = _config(config_dict, str(path))
    with _loading_errors(str(path)):
        empty = _empty_model(model_class(config), config, len(reader.tensors))
        names = _gguf_names(empty, architecture, config.num_hidden_layers)
        # transformers skips the tensors it cannot name (llama 3's rope_freqs): the model would silently differ
        _check_keys([], [tensor.name for tensor in reader.tensors if tensor.name not in names], [])
        held = {names[tensor.name]: tuple(int(n) for n in reversed(tensor.shape)) for tensor in reader.tensors}
        # given a generation config, transformers reads no generation_config.json or custom_generate/ beside the file
        with _quiet_progress():
            model = _build_model(config, held, pretrained_model_name_or_path=str(path), gguf_file=str(path),
                                 local_files_only=True, generation_config=GenerationConfig.from_model_config(config))
    model.generation_config = GenerationConfig.from_model_config(model.config)  # generate() fails on the given one
    tokenizer = _gguf_tokenizer(path, architecture, fields) if "tokenizer.ggml.tokens" in reader.fields else None
    return model, tokenizer


def _read_gguf(path: Path) -> Any:
    """A `gguf.GGUFReader` of `path`, which has read its header, metadata and tensor table."""
    if not is_gguf_available():
        raise KninferError(f"'{path}': reading GGUF files needs the gguf package (0.10 or later): "
                           'pip install gguf, or pip install "kninfer[train]"')
    from gguf import GGUFReader, GGUFValueType

    class StrictReader(GGUFReader):
        """gguf's reader, except that reading past the end of the file raises: gguf's reads empty arrays there, and
        loops for ever over a metadata array whose length is corrupt."""

        def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> Any:
            end = offset + np.dtype(dtype).itemsize * int(count)
            if end > len(self.data):
                raise ValueError(f"it ends before byte {end:,}")
            return super()._get(offset, dtype, count, override_order)

        def _get_field_parts(self, orig_offs: int, raw_type: int) -> Any:
            if raw_type == GGUFValueType.ARRAY:  # its item type (uint32), then its length (uint64)
                length = int(self._get(orig_offs + 4, np.uint64)[0])
                if length > len(self.data) - orig_offs:  # every item takes a byte at least
                    raise ValueError(f"an array at byte {orig_offs:,} claims {length:,} items")
            return super()._get_field_parts(orig_offs, raw_type)

    try:
        with path.open("rb") as file:
            magic = file.read(len(GGUF_MAGIC))
    except OSError as error:
        raise KninferError(f"cannot read '{path}': {error.strerror or error}") from None
    if magic != GGUF_MAGIC:
        raise KninferError(f"'{path}' is not a GGUF file: it does not start with {GGUF_MAGIC.decode()}")
    try:
        return StrictReader(path)
    except (ValueError, KeyError, IndexError, OverflowError, OSError) as error:  # what gguf raises on a damaged file
        raise KninferError(f"'{path}' is a truncated or corrupt GGUF file: {_first_line(error)}") from None


def _gguf_field(reader: Any, key: str, kind: type, path: Path) -> Any:
    """The value of the GGUF metadata field `key` (None when absent), which must be one `kind`."""
    try:
        values = read_field(reader, key)
    except ValueError as error:  # a value of a type transformers cannot read, or a string that is not UTF-8
        raise KninferError(f"'{path}': its GGUF field {key} is unreadable: {_first_line(error)}") from None
    if not values:
        return None
    if len(values) != 1 or type(values[0]) is not kind:  # type(): a bool is no int here
        raise KninferError(f"'{path}': its GGUF field {key} must be one {kind.__name__}, got {values!r:.60}")
    return values[0]


def _gguf_tokenizer_fields(reader: Any, path: Path) -> dict[str, Any]:
    """The tokenizer fields of a GGUF file that transformers misreads or ignores (None where absent), checked."""
    fields = {name: _gguf_field(reader, f"tokenizer.ggml.{name}", kind, path)
              for name, kind in GGUF_TOKENIZER_FIELDS.items()}
    fields["chat_template"] = _gguf_field(reader, "tokenizer.chat_template", str, path)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    size = len(tokens.data) if tokens is not None else 0
    for name in GGUF_SPECIAL_TOKENS.values():
        if fields[name] is not None and not 0 <= fields[name] < size:
            raise KninferError(f"'{path}': its tokenizer.ggml.{name} {fields[name]} is not among its {size} tokens")
    return fields


def _gguf_config(path: Path) -> dict[str, Any]:
    """The config transformers reads from a GGUF file's metadata."""
    try:
        with _quiet_libraries():
            return load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    except (ValueError, KeyError, IndexError, TypeError) as error:  # what its parsing of odd metadata raises
        raise KninferError(f"'{path}': cannot read its GGUF metadata: {_first_line(error)}") from None


def _gguf_names(model: nn.Module, architecture: str, layers: int) -> dict[str, str]:
    """The names of `model`'s tensors in a GGUF file of `architecture`, mapped to the model's names."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    # as transformers' get_gguf_hf_weights_map does, without its walk of every submodule (seconds for 30 layers)
    arch = next(key for key, name in MODEL_ARCH_NAMES.items() if name == architecture)
    gguf_names = get_tensor_name_map(arch, layers)
    names = {}
    for key in model.state_dict():
        module, _, kind = key.rpartition(".")
        gguf_name = gguf_names.get_name(module)
        if gguf_name is not None:
            names[f"{gguf_name}.{kind}"] = key
    return names


def _gguf_tokenizer(path: Path, architecture: str, fields: dict[str, Any]) -> PreTrainedTokenizerFast:
    """The tokenizer transformers converts from a GGUF file, set to the file's special tokens, BOS/EOS flags and chat
    template: transformers 4.57 makes the BOS token the EOS too, and adds a BOS whatever the file says."""
    try:
        with _quiet_libraries(), _quiet_progress():
            tokenizer = GGUF_TOKENIZERS[architecture](vocab_file=str(path), gguf_file=str(path))
        for attribute, name in GGUF_SPECIAL_TOKENS.items():
            token = None if fields[name] is None else tokenizer.convert_ids_to_tokens(fields[name])
            setattr(tokenizer, attribute, token)
        for flag in ("add_bos_token", "add_eos_token"):  # the setters rebuild the post-processor with the tokens above
            setattr(tokenizer, flag, getattr(tokenizer, flag) if fields[flag] is None else fields[flag])
    except Exception as error:  # tokenizers raises bare Exception, transformers' conversion many types
        raise KninferError(f"'{path}': its tokenizer is unreadable: {_first_line(error)}") from None
    tokenizer.chat_template = fields["chat_template"]
    tokenizer.vocab_file = None  # else save_pretrained copies the whole GGUF beside the model as tokenizer.model
    return tokenizer


@contextmanager
def _quiet_progress() -> Iterator[None]:
    """Hide the progress bars transformers' GGUF reading draws on stderr: no logger level or setting turns them off."""
    with redirect_stderr(StringIO()):
        yield


def _read_pt(path: Path) -> dict[str, Any]:
    """The payload of a kninfer `.pt`, read with torch's weights-only unpickler after checking the archive."""
    if path.suffix in NOT_CHECKPOINTS:
        raise KninferError(f"'{path}' {NOT_CHECKPOINTS[path.suffix]}")
    if not zipfile.is_zipfile(path):
        raise KninferError(f"'{path}' is not a kninfer checkpoint (.pt): not a torch archive")
    _check_archive(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        raise KninferError(
            f"'{path}' is refused: it holds pickled objects beyond tensors and plain data, "
            f"which could run code ({refused.group(1) if refused else _first_line(error)})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, TypeError) as error:
        raise KninferError(f"'{path}' is not a readable checkpoint: {_first_line(error)}") from None
    if not isinstance(payload, dict) or payload.get("format") != PT_FORMAT:
        raise KninferError(f"'{path}' is not a kninfer checkpoint (no \"format\": \"{PT_FORMAT}\" entry)")
    return payload


def _check_archive(path: Path) -> None:
    """Raise unless every entry of the zip archive at `path` matches its CRC: torch.load checks none."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, RuntimeError) as error:
        # zipfile reports a damaged directory or header with any of these
        raise KninferError(f"'{path}' is a damaged archive: {_first_line(error)}") from None
    if damaged is not None:
        raise KninferError(f"'{path}' is damaged: its entry '{damaged}' fails its checksum")


def _entry(payload: dict[str, Any], key: str, kind: type, path: Path) -> Any:
    """payload[key], which must be a `kind`."""
    if not isinstance(payload.get(key), kind):
        raise KninferError(f"'{path}' is not a complete kninfer checkpoint: no \"{key}\" {kind.__name__}")
    return payload[key]


def _first_line(error: BaseException) -> str:
    """The first sentence of the error's message (torch and transformers append paragraphs of advice)."""
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return re.split(r"\.\s", line, maxsplit=1)[0]


def _tokenizer_payload(tokenizer: PreTrainedTokenizerFast) -> dict[str, str]:
    specials = {k: str(v) for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    payload = {"tokenizer_json": tokenizer.backend_tokenizer.to_str(), "special_tokens": json.dumps(specials)}
    if isinstance(tokenizer.chat_template, str):
        payload["chat_template"] = tokenizer.chat_template
    return payload


def _tokenizer_from_payload(payload: Any, path: Path) -> PreTrainedTokenizerFast:
    """The tokenizer a `.pt` carries (see `_tokenizer_payload`)."""
    from tokenizers import Tokenizer

    try:
        specials = json.loads(payload["special_tokens"])
        template = payload.get("chat_template")
        if template is not None and not isinstance(template, str):
            raise TypeError("its chat_template is not text")
        return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(payload["tokenizer_json"]),
                                       chat_template=template, **specials)
    except Exception as error:  # tokenizers raises bare Exception for a corrupt JSON, the rest many types
        raise KninferError(f"'{path}': its tokenizer is unreadable: {_first_line(error)}") from None
