"""The export pipeline: trace, check, verify, optionally quantize, then write the bundle files atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from transformers import PreTrainedModel

from kninfer.errors import KninferError
from kninfer.export.dense import densify
from kninfer.export.onnx_config import TASKS, export_onnx
from kninfer.export.verify import Verification, check_graph, top1_agreement, verify_causal_lm, verify_classifier
from kninfer.kron import KroneckerEmbedding, KroneckerLinear

VARIANTS = ("fp32", "dense", "int8")


@dataclass
class ExportReport:
    """What the export wrote and found."""

    onnx_path: Path
    bytes: int
    nodes: int
    kronecker_layers: int
    verification: Verification | None
    int8_agreement: float | None


def export_bundle(
    model: PreTrainedModel, out: str | os.PathLike, *, task: str = "causal-lm", variant: str = "fp32",
    opset: int = 18, tokenizer_json: str | None = None, verify: bool = True,
    sample_ids: list[int] | None = None,
) -> ExportReport:
    """Write `out` (.onnx) with tokenizer.json and kninfer.json beside it; nothing is left if any step fails."""
    out = Path(out)
    if task not in TASKS:
        raise KninferError(f"unknown task '{task}': expected one of {', '.join(TASKS)}")
    if variant not in VARIANTS:
        raise KninferError(f"unknown variant '{variant}': expected one of {', '.join(VARIANTS)}")
    _check_task(model, task)
    model = (densify(model) if variant == "dense" else model).eval()
    layers = sum(isinstance(m, (KroneckerLinear, KroneckerEmbedding)) for m in model.modules())
    with _staging(out) as work:
        fp32 = work / "fp32.onnx"
        with torch.no_grad():
            export_onnx(model, task, fp32, opset)
        check_graph(str(fp32))
        verification = _verify(model, task, fp32) if verify else None
        if verification is not None and not verification.ok:
            raise KninferError(f"verification failed: onnxruntime and PyTorch logits differ by "
                               f"{verification.max_abs_diff:.3g} (> {1e-4:g})")
        final, agreement = fp32, None
        if variant == "int8":
            final = work / "int8.onnx"
            agreement = _quantize(fp32, final, task, model.config.vocab_size, sample_ids)
        size, nodes = _publish(final, bundle_metadata(model, task, variant, out.name), work, out, tokenizer_json)
        return ExportReport(out, size, nodes, layers, verification, agreement)


def quantize_bundle(source: str | os.PathLike, out: str | os.PathLike,
                    sample_ids: list[int] | None = None) -> ExportReport:
    """The int8 bundle `out` (.onnx) of the exported fp32 bundle whose graph is `source`, without tracing again."""
    source, out = Path(source), Path(out)
    try:
        metadata = json.loads((source.parent / "kninfer.json").read_text())
        tokenizer = source.parent / "tokenizer.json"
        tokenizer_json = tokenizer.read_text() if tokenizer.is_file() else None
    except (OSError, json.JSONDecodeError) as error:
        raise KninferError(f"'{source}' is not in a readable bundle (kninfer.json beside it): {error}") from None
    if metadata.get("variant") != "fp32":
        raise KninferError(f"'{source}' is a {metadata.get('variant')} bundle: quantize an fp32 one")
    metadata = {**metadata, "variant": "int8", "onnx_file": out.name, "onnx_data_file": f"{out.name}.data"}
    with _staging(out) as work:
        final = work / "int8.onnx"
        agreement = _quantize(source, final, metadata["task"], metadata["vocab_size"], sample_ids)
        size, nodes = _publish(final, metadata, work, out, tokenizer_json)
        return ExportReport(out, size, nodes, len((metadata["kronecker"] or {}).get("modules", {})), None, agreement)


def bundle_metadata(model: PreTrainedModel, task: str, variant: str, onnx_file: str) -> dict[str, Any]:
    """kninfer.json: what the runtime needs to drive the graph (see the bundle contract)."""
    import onnxruntime
    import transformers

    from kninfer.modeling.compress import count_parameters

    config = model.config
    labels = [config.id2label[i] for i in range(config.num_labels)] if task == "sequence-classification" else None
    kv = None
    if task == "causal-lm":
        kv = {"num_layers": config.n_layer, "num_heads": config.n_head, "head_dim": config.n_embd // config.n_head,
              "past_key": "past_key_values.{i}.key", "past_value": "past_key_values.{i}.value",
              "present_key": "present.{i}.key", "present_value": "present.{i}.value"}
    eos = config.eos_token_id
    return {
        "format": "kninfer-bundle", "format_version": 1, "onnx_file": onnx_file,
        "onnx_data_file": f"{onnx_file}.data", "task": task,
        "model_type": config.model_type, "variant": variant, "context_length": config.n_positions,
        "vocab_size": config.vocab_size, "eos_token_id": eos, "bos_token_id": config.bos_token_id,
        "pad_token_id": config.pad_token_id if config.pad_token_id is not None else eos,
        "labels": labels, "glue_task": getattr(config, "glue_task", None),
        "max_input_length": getattr(config, "max_input_length", None), "kv_cache": kv,
        "kronecker": getattr(config, "kronecker", None), "parameters": count_parameters(model),
        "versions": {"kninfer": _version(), "torch": torch.__version__, "transformers": transformers.__version__,
                     "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
    }


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kninfer")
    except PackageNotFoundError:
        return "unknown"


def _check_task(model: PreTrainedModel, task: str) -> None:
    is_classifier = type(model).__name__.endswith("ForSequenceClassification")
    if is_classifier != (task == "sequence-classification"):
        raise KninferError(f"task '{task}' does not fit a {type(model).__name__}: use --task "
                           f"{'sequence-classification' if is_classifier else 'causal-lm'}")
    if is_classifier and model.config.pad_token_id is None:
        raise KninferError("a classifier needs config.pad_token_id (the bundle pads with eos on the right)")


def _verify(model: PreTrainedModel, task: str, path: Path) -> Verification:
    if task == "causal-lm":
        return verify_causal_lm(model, str(path), lengths=[7, 4])
    return verify_classifier(model, str(path))


def _as_batch(ids: list[int]):
    import numpy as np

    return np.asarray([ids], np.int64)


@contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A scratch folder beside `out`, removed afterwards whatever happens; OSErrors become one-line errors."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as error:
        raise KninferError(f"cannot write to '{out.parent}': {error.strerror}") from None
    try:
        yield work
    except OSError as error:
        raise KninferError(f"cannot write '{out}': {error.strerror or error}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _quantize(fp32: Path, int8: Path, task: str, vocab_size: int, sample_ids: list[int] | None) -> float | None:
    """Write the int8 graph; for a causal LM return its top-1 agreement with the fp32 one on sample ids."""
    from kninfer.export.quantize import quantize_int8

    quantize_int8(fp32, int8)
    if task != "causal-lm":
        return None
    ids = sample_ids or list(range(0, vocab_size, max(1, vocab_size // 64)))
    return top1_agreement(str(fp32), str(int8), _as_batch(ids))


def _publish(graph_path: Path, metadata: dict[str, Any], work: Path, out: Path,
             tokenizer_json: str | None) -> tuple[int, int]:
    """Stage the graph (metadata in its props), kninfer.json and tokenizer.json, then rename them beside `out`;
    returns the graph's bytes on disk and its node count."""
    graph = onnx.load(str(graph_path))
    onnx.helper.set_model_props(graph, {k: json.dumps(v) for k, v in metadata.items()})
    _save(graph, work / out.name)
    names = [out.name, f"{out.name}.data"]
    if tokenizer_json is not None:
        (work / "tokenizer.json").write_text(tokenizer_json)
        names.append("tokenizer.json")
    (work / "kninfer.json").write_text(json.dumps(metadata, indent=2) + "\n")
    names.append("kninfer.json")  # last: its presence marks a complete bundle
    for name in names:
        os.replace(work / name, out.parent / name)
    return sum((out.parent / n).stat().st_size for n in names if n.startswith(out.name)), len(graph.graph.node)


def _save(graph: onnx.ModelProto, path: Path) -> None:
    """The graph in `path`, its weights beside it in `path`.data: onnxruntime memory-maps that file instead of
    copying a parsed protobuf (peak RSS at load: 59 MB instead of 569 MB for GPT-2-small-sized kngpt2 --tie-head),
    and the 2 GB protobuf limit never applies."""
    onnx.save_model(graph, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{path.name}.data", size_threshold=1024)
