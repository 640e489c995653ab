"""The export pipeline: trace, check, verify, optionally quantize, then publish the graph into its bundle folder.

Publishing keeps a bundle whole: the weights go to a file named for this export only (NAME.onnx.<8 hex>.data), then
come the tokenizer and the graph, and kninfer.json, renamed last, commits them with the graph's and tokenizer's
sha256. A kill before that leaves the previous entry, which either still matches its files or is refused at load as
inconsistent; it never runs a new graph with old files. Only then are the files the replaced entry named deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from transformers import PreTrainedModel

from kninfer.atomic import umask_permissions
from kninfer.errors import KninferError
from kninfer.export.dense import densify
from kninfer.export.onnx_config import TASKS, export_onnx
from kninfer.export.verify import TOLERANCE, Verification, check_graph, top1_agreement, verify_graph
from kninfer.kron import KroneckerEmbedding, KroneckerLinear
from kninfer.modeling.families import family_of
from kninfer.modeling.io import is_classifier
from kninfer.runtime.bundle import (
    FILE_FIELDS,
    HASH_FIELDS,
    METADATA_FILE,
    TOKENIZER_FILE,
    describe_models,
    file_sha256,
    graph_bundle,
    read_bundle,
    read_models,
)

QUANTIZED = ("int8", "int4", "int8-dynamic")  # variants made from the traced fp32 graph by export/quantize.py
VARIANTS = ("fp32", "dense", *QUANTIZED)


@dataclass
class ExportReport:
    """What the export wrote and found."""

    onnx_path: Path
    bytes: int
    nodes: int
    kronecker_layers: int
    verification: Verification | None
    agreement: float | None  # a quantized causal LM's top-1 next-token agreement with its fp32 graph


def export_bundle(
    model: PreTrainedModel, out: str | os.PathLike, *, task: str = "causal-lm", variant: str = "fp32",
    opset: int = 18, tokenizer_json: str | None = None, verify: bool = True,
    sample_ids: list[int] | None = None, overwrite: bool = False, chat_template: str | None = None,
    fused_attention: bool = True,
) -> ExportReport:
    """Write `out` (.onnx) and its weights, tokenizer and kninfer.json entry beside it, other graphs of the folder
    kept; nothing changes if any step fails. `overwrite` replaces files kninfer.json does not list; `chat_template`
    (the tokenizer's Jinja template, or None) is stored in the entry for `kninfer chat`; `fused_attention` traces
    each attention core to one onnxruntime contrib node (GroupQueryAttention, MultiHeadAttention)."""
    out = Path(out)
    if task not in TASKS:
        raise KninferError(f"unknown task '{task}': expected one of {', '.join(TASKS)}")
    if variant not in VARIANTS:
        raise KninferError(f"unknown variant '{variant}': expected one of {', '.join(VARIANTS)}")
    _check_task(model, task)
    _check_vocabulary(tokenizer_json, model.config.vocab_size)
    _kept_models(out, overwrite)  # refuse before the slow part
    model = (densify(model) if variant == "dense" else model).eval()
    layers = sum(isinstance(m, (KroneckerLinear, KroneckerEmbedding)) for m in model.modules())
    entry = bundle_metadata(model, task, variant) | {"chat_template": chat_template}
    with _staging(out) as work:
        fp32 = work / "fp32.onnx"
        with torch.no_grad():
            export_onnx(model, task, fp32, opset, family_of(model.config).name, fused_attention)
        check_graph(str(fp32))
        if entry["kv_cache"] is not None:
            entry["kv_cache"]["shared_buffer"] = writes_cache_in_place(onnx.load(str(fp32), load_external_data=False),
                                                                       entry["kv_cache"])
        verification = verify_graph(model, graph_bundle(fp32, entry)) if verify else None
        if verification is not None and not verification.ok:
            raise KninferError(f"verification failed: onnxruntime and PyTorch logits differ by "
                               f"{verification.max_abs_diff:.3g} (> {verification.bound:.3g}: {TOLERANCE:g} × "
                               "the logits' RMS, at least that)")
        final, agreement = fp32, None
        if variant in QUANTIZED:
            final = work / f"{variant}.onnx"
            agreement = _quantize(fp32, final, entry, sample_ids)
        size, nodes = _publish(final, entry, work, out, tokenizer_json, overwrite)
        return ExportReport(out, size, nodes, layers, verification, agreement)


def quantize_bundle(source: str | os.PathLike, out: str | os.PathLike, sample_ids: list[int] | None = None, *,
                    variant: str = "int8", overwrite: bool = False) -> ExportReport:
    """The `variant` (QUANTIZED) graph `out` (.onnx) of the exported fp32 graph `source` (or its folder), without
    tracing again."""
    out = Path(out)
    if variant not in QUANTIZED:
        raise KninferError(f"unknown quantized variant '{variant}': expected one of {', '.join(QUANTIZED)}")
    bundle = read_bundle(source, need_tokenizer=False)
    if bundle.meta.get("variant") != "fp32":
        raise KninferError(f"'{bundle.onnx_path}' is a {bundle.meta.get('variant')} bundle: quantize an fp32 one")
    _kept_models(out, overwrite)
    entry = {**{k: v for k, v in bundle.meta.items() if k not in FILE_FIELDS}, "variant": variant}
    modules = (entry.get("kronecker") or {}).get("modules")
    with _staging(out) as work:
        tokenizer_json = bundle.tokenizer_path.read_bytes().decode("utf-8") if bundle.tokenizer_path else None
        final = work / f"{variant}.onnx"
        agreement = _quantize(bundle.onnx_path, final, entry, sample_ids)
        size, nodes = _publish(final, entry, work, out, tokenizer_json, overwrite)
        return ExportReport(out, size, nodes, len(modules) if isinstance(modules, dict) else 0, None, agreement)


def bundle_metadata(model: PreTrainedModel, task: str, variant: str) -> dict[str, Any]:
    """A graph's kninfer.json entry, less the files it is written to: what the runtime needs to drive it."""
    import onnxruntime
    import transformers

    from kninfer.modeling.compress import count_parameters

    config = model.config
    labels = [config.id2label[i] for i in range(config.num_labels)] if task == "sequence-classification" else None
    kv = None
    if task == "causal-lm":
        heads = config.num_attention_heads  # GPT2Config maps the num_*/hidden_size names to its n_* fields
        kv = {"num_layers": config.num_hidden_layers,
              "num_heads": getattr(config, "num_key_value_heads", None) or heads,
              "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
              "past_key": "past_key_values.{i}.key", "past_value": "past_key_values.{i}.value",
              "present_key": "present.{i}.key", "present_value": "present.{i}.value"}
    eos = config.eos_token_id
    return {
        "task": task, "model_type": config.model_type, "variant": variant,
        "context_length": config.max_position_embeddings,
        "vocab_size": config.vocab_size, "eos_token_id": eos, "bos_token_id": config.bos_token_id,
        "pad_token_id": config.pad_token_id if config.pad_token_id is not None else eos,
        "labels": labels, "glue_task": getattr(config, "glue_task", None),
        "max_input_length": getattr(config, "max_input_length", None), "kv_cache": kv,
        "kronecker": _spec_dict(config), "parameters": count_parameters(model),
        "versions": {"kninfer": _version(), "torch": torch.__version__, "transformers": transformers.__version__,
                     "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
    }


def writes_cache_in_place(graph: onnx.ModelProto, kv: dict[str, Any]) -> bool:
    """Whether each layer's past key and value feed one GroupQueryAttention node alone, which outputs that layer's
    present key and value: onnxruntime's kernel then appends the step in place when past and present are bound to
    one buffer (docs/architecture.md, "KV cache")."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    for layer in range(kv["num_layers"]):
        past, present = ([kv[f"{role}_{part}"].format(i=layer) for part in ("key", "value")]
                         for role in ("past", "present"))
        nodes = readers.get(past[0], [])
        if len(nodes) != 1 or readers.get(past[1]) != nodes or nodes[0].op_type != "GroupQueryAttention":
            return False
        if list(nodes[0].input[3:5]) != past or list(nodes[0].output[1:3]) != present:
            return False
    return True


def _spec_dict(config: Any) -> dict[str, Any] | None:
    """A Kronecker student's spec as config.json holds it; None for a dense model."""
    spec = getattr(config, "kronecker", None)
    return None if spec is None else spec.to_dict()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kninfer")
    except PackageNotFoundError:
        return "unknown"


def _check_task(model: PreTrainedModel, task: str) -> None:
    classifier = is_classifier(model)
    if classifier != (task == "sequence-classification"):
        raise KninferError(f"task '{task}' does not fit a {type(model).__name__}: use --task "
                           f"{'sequence-classification' if classifier else 'causal-lm'}")
    if classifier and model.config.pad_token_id is None:
        raise KninferError("a classifier needs config.pad_token_id (the bundle pads with eos on the right)")


def _check_vocabulary(tokenizer_json: str | None, vocab_size: int) -> None:
    """A tokenizer with ids past the model's embedding makes onnxruntime fail at the first such token."""
    if tokenizer_json is None:
        return
    from tokenizers import Tokenizer

    try:
        size = Tokenizer.from_str(tokenizer_json).get_vocab_size(with_added_tokens=True)
    except Exception as error:  # tokenizers raises a bare Exception for bad JSON
        raise KninferError(f"the tokenizer is not readable: {str(error).splitlines()[0]}") from None
    if size > vocab_size:
        raise KninferError(f"the tokenizer has {size} tokens but the model's vocabulary {vocab_size}: "
                           "pass the model's own tokenizer")


def _as_batch(ids: list[int]):
    import numpy as np

    return np.asarray([ids], np.int64)


@contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A scratch folder beside `out`, removed afterwards whatever happens (and those of killed exports of `out`
    before it is made); OSErrors become one-line errors."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_staging_leftovers(out)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as error:
        raise KninferError(f"cannot write to '{out.parent}': {error.strerror}") from None
    try:
        yield work
    except OSError as error:
        raise KninferError(f"cannot write '{out}': {error.strerror or error}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _quantize(fp32: Path, target: Path, entry: dict[str, Any], sample_ids: list[int] | None) -> float | None:
    """Write the graph of entry's quantized variant; for a causal LM return its top-1 agreement with the fp32 one on
    sample ids."""
    from kninfer.export.quantize import quantize

    quantize(fp32, target, entry["variant"])
    if entry["task"] != "causal-lm":
        return None
    vocab_size = entry["vocab_size"]
    ids = sample_ids or list(range(0, vocab_size, max(1, vocab_size // 64)))
    return top1_agreement(graph_bundle(fp32, entry), graph_bundle(target, entry), _as_batch(ids))


def _remove_staging_leftovers(out: Path) -> None:
    """Folders that _staging made for `out` (tempfile.mkdtemp: the prefix and 8 random characters)."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.[a-z0-9_]{{8}}")
    for path in out.parent.iterdir():
        if pattern.fullmatch(path.name) and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)


def _publish(graph_path: Path, entry: dict[str, Any], work: Path, out: Path, tokenizer_json: str | None,
             overwrite: bool) -> tuple[int, int]:
    """Stage the graph (its entry in its props), weights, tokenizer and the folder's new kninfer.json, then rename
    them beside `out` in that order, kninfer.json last; returns the graph's bytes on disk and its node count."""
    models = _kept_models(out, overwrite)  # again: another graph may have been exported to the folder meanwhile
    tokenizer = None if tokenizer_json is None else tokenizer_json.encode("utf-8")
    entry = {**entry, "onnx_data_file": f"{out.name}.{uuid.uuid4().hex[:8]}.data",
             "tokenizer_file": _tokenizer_file(out, models, tokenizer),
             "tokenizer_sha256": None if tokenizer is None else hashlib.sha256(tokenizer).hexdigest()}
    graph = onnx.load(str(graph_path))
    onnx.helper.set_model_props(graph, {k: json.dumps(v) for k, v in entry.items() if k not in HASH_FIELDS})
    _save(graph, work / out.name, entry["onnx_data_file"])
    staged = [entry["onnx_data_file"], *_stage_tokenizer(work, out, entry["tokenizer_file"], tokenizer, models,
                                                         overwrite), out.name]
    entry["onnx_sha256"] = file_sha256(work / out.name)
    described = {**models, out.name: entry}
    (work / METADATA_FILE).write_text(describe_models(described), encoding="utf-8")
    umask_permissions(work)  # tempfile and onnx write some files 0600; a bundle's files get plain open()'s modes
    for name in [*staged, METADATA_FILE]:  # kninfer.json last: the commit
        os.replace(work / name, out.parent / name)
    _remove_stale(out, models.get(out.name), described)
    return sum((out.parent / n).stat().st_size for n in (out.name, entry["onnx_data_file"])), len(graph.graph.node)


def _stage_tokenizer(work: Path, out: Path, name: str | None, tokenizer: bytes | None,
                     models: dict[str, dict[str, Any]], overwrite: bool) -> list[str]:
    """Write the tokenizer into `work` unless the folder holds these bytes under `name` already; what was written."""
    if tokenizer is None or _holds(out.parent / name, tokenizer):
        return []
    _refuse_foreign(out.parent / name, models, overwrite)
    (work / name).write_bytes(tokenizer)
    return [name]


def _kept_models(out: Path, overwrite: bool) -> dict[str, dict[str, Any]]:
    """The entries of `out`'s folder that this export keeps; refuses to replace what kninfer did not write."""
    models = {}
    if (out.parent / METADATA_FILE).exists():
        try:
            models = read_models(out.parent)
        except KninferError as error:
            if not overwrite:
                raise KninferError(f"{error}; refusing to replace it: remove it or export to another folder") from None
    _refuse_foreign(out, models, overwrite)
    return models


def _refuse_foreign(path: Path, models: dict[str, dict[str, Any]], overwrite: bool) -> None:
    if path.exists() and path.name not in _named(models) and not overwrite:
        raise KninferError(f"'{path}' exists and '{path.parent / METADATA_FILE}' does not list it: refusing to "
                           "replace a file kninfer did not write (remove it or pick another name)")


def _tokenizer_file(out: Path, models: dict[str, dict[str, Any]], tokenizer: bytes | None) -> str | None:
    """The folder's tokenizer.json when free, the same, or only this graph's; else NAME.tokenizer.json."""
    if tokenizer is None:
        return None
    shared = out.parent / TOKENIZER_FILE
    users = {name for name, entry in models.items() if entry.get("tokenizer_file") == TOKENIZER_FILE}
    if not shared.exists() or _holds(shared, tokenizer) or users == {out.name}:
        return TOKENIZER_FILE
    return f"{out.stem}.{TOKENIZER_FILE}"


def _holds(path: Path, data: bytes) -> bool:
    return path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data


def _named(models: dict[str, dict[str, Any]]) -> set[str]:
    """Every file the entries name: graphs, weights, tokenizers."""
    files = {entry.get(key) for entry in models.values() for key in ("onnx_data_file", "tokenizer_file")}
    return set(models) | {name for name in files if isinstance(name, str)}


def _remove_stale(out: Path, replaced: dict[str, Any] | None, models: dict[str, dict[str, Any]]) -> None:
    """Delete what no entry names any more, among the files kninfer writes for `out`: its weights (the replaced
    entry's and those of killed exports) and the tokenizer the replaced entry used."""
    weights = re.compile(rf"{re.escape(out.name)}(\.[0-9a-f]{{8}})?\.data")
    stale = {path.name for path in out.parent.iterdir() if weights.fullmatch(path.name)}
    if replaced is not None and replaced.get("tokenizer_file") in (TOKENIZER_FILE, f"{out.stem}.{TOKENIZER_FILE}"):
        stale.add(replaced["tokenizer_file"])
    for name in stale - _named(models):
        with contextlib.suppress(OSError):  # the bundle is committed: a file left behind only costs disk space
            (out.parent / name).unlink()


def _save(graph: onnx.ModelProto, path: Path, data_file: str) -> None:
    """The graph in `path`, its weights beside it in `data_file`: onnxruntime memory-maps that file instead of
    copying a parsed protobuf (peak RSS at load: 59 MB instead of 569 MB for GPT-2-small-sized kngpt2 --tie-head),
    and the 2 GB protobuf limit never applies."""
    onnx.save_model(graph, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_file, size_threshold=1024)
