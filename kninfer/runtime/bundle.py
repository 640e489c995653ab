"""Read and check an exported bundle: a folder of ONNX graphs, their tokenizers, and kninfer.json describing them."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import mmap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from kninfer.errors import KninferError
from kninfer.runtime.tokenizer import load_tokenizer

FORMAT = "kninfer-bundle"
FORMAT_VERSION = 2  # 2: {"models": {NAME.onnx: entry}}; 1 (still read): one graph, its entry at the top level
METADATA_FILE = "kninfer.json"
TOKENIZER_FILE = "tokenizer.json"
MAX_METADATA_BYTES = 16 << 20  # a few kB per graph: anything near this is not a kninfer.json
TASKS = ("causal-lm", "sequence-classification")
KV_KEYS = ("num_layers", "num_heads", "head_dim", "past_key", "past_value", "present_key", "present_value")
HASH_FIELDS = ("onnx_sha256", "tokenizer_sha256")
FILE_FIELDS = ("onnx_data_file", "tokenizer_file", *HASH_FIELDS)  # what the export sets per written graph
# An entry's fields: JSON type and whether it must be there (otherwise absent or null)
FIELDS: dict[str, tuple[type, bool]] = {
    "task": (str, True), "context_length": (int, True), "vocab_size": (int, True), "eos_token_id": (int, True),
    "pad_token_id": (int, True), "bos_token_id": (int, False), "max_input_length": (int, False),
    "onnx_data_file": (str, False), "tokenizer_file": (str, False), "onnx_sha256": (str, False),
    "tokenizer_sha256": (str, False), "labels": (list, False), "glue_task": (str, False), "kv_cache": (dict, False),
    "model_type": (str, False), "variant": (str, False), "parameters": (int, False), "kronecker": (dict, False),
    "versions": (dict, False), "chat_template": (str, False),
}
KV_FIELDS: dict[str, tuple[type, bool]] = {**dict.fromkeys(KV_KEYS[:3], (int, True)),
                                           **dict.fromkeys(KV_KEYS[3:], (str, True)), "shared_buffer": (bool, False)}
JSON_TYPES = {int: "an integer", str: "a string", list: "a list", dict: "an object", bool: "true or false"}
# Where an ONNX model can hold a TensorProto (onnx.proto field numbers): message -> {field: message it holds}
ONNX_MESSAGES: dict[str, dict[int, str]] = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "function": {7: "node", 11: "attribute"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
    "tensor": {13: "entry"},  # external_data: StringStringEntryProto (key 1, value 2)
}


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
    # the graph writes each step's keys and values into the past tensors at the mask's past length (onnxruntime's
    # GroupQueryAttention): past and present may be one buffer, longer than the mask, bound to both
    shared_buffer: bool = False

    def past_names(self) -> list[str]:
        """Graph input names of the cache, in layer order, key before value."""
        return [f.format(i=i) for i in range(self.num_layers) for f in (self.past_key, self.past_value)]

    def present_names(self) -> list[str]:
        """Graph output names of the updated cache, in the same order as `past_names`."""
        return [f.format(i=i) for i in range(self.num_layers) for f in (self.present_key, self.present_value)]


@dataclass(frozen=True)
class Bundle:
    """An exported model on disk and the facts the runtime needs from its kninfer.json entry."""

    directory: Path
    onnx_path: Path
    data_path: Path | None  # the graph's weights, when outside the .onnx file (None from graph_bundle)
    tokenizer_path: Path | None  # None from read_bundle(..., need_tokenizer=False) and graph_bundle
    task: str
    context_length: int
    vocab_size: int
    eos_token_id: int
    pad_token_id: int
    labels: list[str] | None
    glue_task: str | None
    max_input_length: int  # inputs are cut here: a classifier's fine-tuning length, else the context
    kv_cache: KVCacheSpec | None
    meta: dict[str, Any]


def read_bundle(path: str | Path, need_tokenizer: bool = True) -> Bundle:
    """The bundle at `path`: a folder holding one graph, or a graph's .onnx file; checked before onnxruntime
    opens anything (field types and ranges, files inside the folder, sha256 of graph and tokenizer). The tokenizer
    itself is loaded once, by read_tokenizer."""
    directory, name, entry = _select(Path(path))
    bundle = graph_bundle(directory / name, entry)
    where = _where(bundle.onnx_path)
    onnx_path = _existing(directory, name, where, "the bundle's model")
    data_file = entry.get("onnx_data_file")
    data_path = _existing(directory, data_file, where, "the file holding the model's weights") if data_file else None
    tokenizer_path = _tokenizer_path(directory, entry, where, need_tokenizer)
    _check_hash(onnx_path, entry.get("onnx_sha256"), directory)
    if tokenizer_path is not None:
        _check_hash(tokenizer_path, entry.get("tokenizer_sha256"), directory)
    _check_external_data(directory, onnx_path)
    return dataclasses.replace(bundle, data_path=data_path, tokenizer_path=tokenizer_path)


def graph_bundle(onnx_path: Path, entry: dict[str, Any]) -> Bundle:
    """A graph and its kninfer.json entry as a Bundle, the entry checked (types, ranges, cache layout) but no file:
    read_bundle adds the file checks; the export runs a graph this way before it publishes it."""
    where = _where(onnx_path)
    _check_fields(entry, FIELDS, where)
    _check_values(entry, where)
    return Bundle(
        directory=onnx_path.parent,
        onnx_path=onnx_path,
        data_path=None,
        tokenizer_path=None,
        task=entry["task"],
        context_length=entry["context_length"],
        vocab_size=entry["vocab_size"],
        eos_token_id=entry["eos_token_id"],
        pad_token_id=entry["pad_token_id"],
        labels=entry.get("labels"),
        glue_task=entry.get("glue_task"),
        max_input_length=entry.get("max_input_length") or entry["context_length"],
        kv_cache=_kv_cache(entry, where),
        meta=entry,
    )


def read_tokenizer(bundle: Bundle) -> Tokenizer:
    """The bundle's tokenizer, refused when it has ids past the model's vocabulary (onnxruntime would fail at the
    first such token)."""
    where = _where(bundle.onnx_path)
    if bundle.tokenizer_path is None:
        raise KninferError(f"{where} has no tokenizer: export the model with `--tokenizer DIR|tokenizer.json`")
    tokenizer = load_tokenizer(bundle.tokenizer_path)
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > bundle.vocab_size:
        raise KninferError(f"{where}: the tokenizer '{bundle.tokenizer_path}' has {size} tokens, the model's "
                           f"vocabulary {bundle.vocab_size}: they do not belong together")
    return tokenizer


def read_models(directory: Path) -> dict[str, dict[str, Any]]:
    """Every graph the folder's kninfer.json describes: file name -> entry (a version-1 file describes one)."""
    meta_path = directory / METADATA_FILE
    if not meta_path.is_file():
        raise KninferError(f"'{meta_path}' is missing: '{directory}' is not a kninfer bundle (run `kninfer export`)")
    meta = _read_json(meta_path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise KninferError(f"'{meta_path}' has no \"format\": \"{FORMAT}\": not a kninfer bundle description")
    version = meta.get("format_version")
    if not _is_int(version) or version not in (1, FORMAT_VERSION):
        raise KninferError(f"'{meta_path}' has format_version {_show(version)}; this kninfer reads versions 1 "
                           f"and {FORMAT_VERSION}")
    models = _version1_models(meta, meta_path) if version == 1 else meta.get("models")
    if not isinstance(models, dict) or not models or not all(isinstance(e, dict) for e in models.values()):
        raise KninferError(f"'{meta_path}': \"models\" is {_show(models)}, expected an object of graph entries")
    for name in models:
        if not _plain_name(name):
            raise KninferError(f"'{meta_path}': model {name!r} is not a file name in the bundle folder")
    return models


def describe_models(models: dict[str, dict[str, Any]]) -> str:
    """The text of a kninfer.json describing these graphs."""
    return json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, "models": models}, indent=2) + "\n"


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def external_data_locations(onnx_path: Path) -> set[str]:
    """The external-data locations an ONNX file names, read from its protobuf (the runtime has no onnx package)."""
    found: set[str] = set()
    with onnx_path.open("rb") as file:
        if file.seek(0, 2) == 0:
            return found
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:  # weights inside the graph stay unread
            _walk(data, 0, len(data), "model", found)
    return found


def _select(path: Path) -> tuple[Path, str, dict[str, Any]]:
    """(folder, graph file name, kninfer.json entry) for a folder holding one graph or for a graph's file."""
    if not path.exists():
        raise KninferError(f"bundle '{path}' does not exist: expected a bundle directory or its .onnx file")
    if path.is_file() and path.suffix == ".onnx":
        models = read_models(path.parent)
        if path.name not in models:
            raise KninferError(f"'{path}' is not a model of its bundle: '{path.parent / METADATA_FILE}' lists "
                               f"{', '.join(models)}")
        return path.parent, path.name, models[path.name]
    directory = path if path.is_dir() else path.parent
    models = read_models(directory)
    if len(models) > 1:
        raise KninferError(f"'{directory}' holds {len(models)} models: pass one of: "
                           f"{', '.join(str(directory / name) for name in models)}")
    (name, entry), = models.items()
    return directory, name, entry


def _where(onnx_path: Path) -> str:
    """How messages name a graph's entry: its folder's kninfer.json and the graph's file name."""
    return f"'{onnx_path.parent / METADATA_FILE}' ({onnx_path.name})"


def _read_json(meta_path: Path) -> Any:
    try:
        if meta_path.stat().st_size > MAX_METADATA_BYTES:
            raise KninferError(f"'{meta_path}' is over {MAX_METADATA_BYTES >> 20} MiB: not a kninfer bundle "
                               "description")
        return json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise KninferError(f"'{meta_path}' is not valid JSON: {error}") from None
    except OSError as error:
        raise KninferError(f"cannot read '{meta_path}': {error.strerror or error}") from None


def _version1_models(meta: dict[str, Any], meta_path: Path) -> dict[str, dict[str, Any]]:
    """A version-1 kninfer.json as version 2's models: its one graph, the folder's tokenizer.json."""
    _check_fields(meta, {"onnx_file": (str, True)}, f"'{meta_path}'")
    entry = {k: v for k, v in meta.items() if k not in ("format", "format_version", "onnx_file")}
    return {meta["onnx_file"]: {"tokenizer_file": TOKENIZER_FILE, **entry}}


def _check_fields(values: dict[str, Any], fields: dict[str, tuple[type, bool]], where: str) -> None:
    """Each field of the JSON type it must have; bools are not numbers here."""
    for key, (kind, required) in fields.items():
        value = values.get(key)
        if value is None and not required:
            continue
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise KninferError(f"{where}: \"{key}\" is {_show(value)}, expected {'' if required else 'null or '}"
                               f"{JSON_TYPES[kind]}")


def _check_values(entry: dict[str, Any], where: str) -> None:
    """Ranges: the task known, sizes positive, token ids inside the vocabulary, labels strings."""
    if entry["task"] not in TASKS:
        raise KninferError(f"{where}: task {entry['task']!r} is not one of {', '.join(TASKS)}")
    _check_positive(entry, ("context_length", "vocab_size", "max_input_length"), where)
    for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
        if entry.get(key) is not None and not 0 <= entry[key] < entry["vocab_size"]:
            raise KninferError(f"{where}: \"{key}\" is {entry[key]}, outside the vocabulary "
                               f"(0 to {entry['vocab_size'] - 1})")
    labels = entry.get("labels")
    if labels is not None and not all(isinstance(label, str) for label in labels):
        raise KninferError(f"{where}: \"labels\" is {_show(labels)}, expected a list of strings")


def _check_positive(values: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    for key in keys:
        if values.get(key) is not None and values[key] < 1:
            raise KninferError(f"{where}: \"{key}\" is {values[key]}, expected 1 or more")


def _kv_cache(entry: dict[str, Any], where: str) -> KVCacheSpec | None:
    """The cache layout of a causal LM: sizes positive, names templates with one {i} for the layer."""
    if entry["task"] != "causal-lm":
        return None
    spec = entry.get("kv_cache")
    if not isinstance(spec, dict):
        raise KninferError(f"{where}: a causal-lm bundle needs \"kv_cache\" with {', '.join(KV_KEYS)}")
    _check_fields(spec, KV_FIELDS, f"{where} kv_cache")
    _check_positive(spec, KV_KEYS[:3], f"{where} kv_cache")
    for key in KV_KEYS[3:]:
        rest = spec[key].replace("{i}", "", 1)
        if "{i}" not in spec[key] or "{" in rest or "}" in rest:
            raise KninferError(f"{where} kv_cache: \"{key}\" is {_show(spec[key])}, expected a name with one {{i}}")
    return KVCacheSpec(**{key: spec[key] for key in KV_KEYS}, shared_buffer=spec.get("shared_buffer") is True)


def _existing(directory: Path, name: str, where: str, role: str) -> Path:
    path = _inside(directory, name, where)
    if not path.is_file():
        raise KninferError(f"'{path}' is missing: kninfer.json names it as {role}")
    return path


def _inside(directory: Path, name: str, where: str) -> Path:
    """directory/name, refused unless it stays in the folder: no absolute path, no .., no symlink out."""
    relative = Path(name)
    escapes = not name.isprintable() or relative.is_absolute() or ".." in relative.parts
    if escapes or not _resolves_in(directory, relative):
        raise KninferError(f"{where}: {name!r} is outside the bundle folder '{directory}': refused")
    return directory / relative


def _resolves_in(directory: Path, relative: Path) -> bool:
    """Whether directory/relative, symlinks followed, is still under the folder."""
    try:
        return (directory / relative).resolve().is_relative_to(directory.resolve())
    except (OSError, RuntimeError):  # a symlink loop (RuntimeError before Python 3.13)
        return False


def _tokenizer_path(directory: Path, entry: dict[str, Any], where: str, need_tokenizer: bool) -> Path | None:
    name = entry.get("tokenizer_file")
    if name is None:
        if need_tokenizer:
            raise KninferError(f"{where} has no tokenizer: export the model with `--tokenizer DIR|tokenizer.json`")
        return None
    path = _inside(directory, name, where)
    if not path.is_file():
        raise KninferError(f"'{path}' is missing: export the model with `--tokenizer DIR|tokenizer.json`")
    return path


def _check_hash(path: Path, expected: str | None, directory: Path) -> None:
    """A file must be the one its export recorded: a kill between renames must not run new graph, old files."""
    if expected is None:  # a version-1 bundle: no hashes recorded
        return
    try:
        found = file_sha256(path)
    except OSError as error:
        raise KninferError(f"cannot read '{path}': {error.strerror or error}") from None
    if found != expected:
        raise KninferError(f"'{path}' is not the file '{directory / METADATA_FILE}' records (sha256 differs): the "
                           "bundle is inconsistent (an export was interrupted or a file was replaced); export again")


def _check_external_data(directory: Path, onnx_path: Path) -> None:
    try:
        locations = external_data_locations(onnx_path)
    except (OSError, ValueError, RecursionError) as error:
        raise KninferError(f"'{onnx_path}' is not a loadable ONNX model: {error}") from None
    for location in locations:
        _inside(directory, location, f"'{onnx_path}' reads external data from a file that")


def _walk(data: mmap.mmap, start: int, end: int, message: str, found: set[str]) -> None:
    """Collect the "location" values of the external-data entries in data[start:end], a `message`."""
    if message == "entry":
        fields = {number: data[a:b] for number, a, b in _fields(data, start, end)}
        if fields.get(1) == b"location":
            found.add(fields.get(2, b"").decode("utf-8"))
        return
    children = ONNX_MESSAGES[message]
    for number, a, b in _fields(data, start, end):
        if number in children:
            _walk(data, a, b, children[number], found)


def _fields(data: mmap.mmap, pos: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of each length-delimited field of one protobuf message; others skipped."""
    while pos < end:
        tag, pos = _varint(data, pos, end)
        wire = tag & 7
        if wire == 2:
            size, pos = _varint(data, pos, end)
            if pos + size > end:
                raise ValueError(f"a field runs past its message at byte {pos}")
            yield tag >> 3, pos, pos + size
            pos += size
        elif wire == 0:
            pos = _varint(data, pos, end)[1]
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise ValueError(f"protobuf wire type {wire} at byte {pos}")
    if pos != end:
        raise ValueError(f"a field runs past its message at byte {end}")


def _varint(data: mmap.mmap, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while pos < end and shift < 64:
        byte = data[pos]
        value, pos, shift = value | (byte & 0x7F) << shift, pos + 1, shift + 7
        if byte < 0x80:
            return value, pos
    raise ValueError(f"a truncated or overlong varint at byte {pos}")


def _plain_name(name: str) -> bool:
    """A file name directly in the folder (no separator, not . or ..), printable on one line."""
    return name.isprintable() and name not in ("", ".", "..") and Path(name).name == name


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _show(value: Any) -> str:
    """A JSON value for a one-line message, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."

