"""The export pipeline: trace, check, verify, optionally quantize, then write the bundle files atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
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
EXTERNAL_DATA_BYTES = 2 * 1024**3


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
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as error:
        raise KninferError(f"cannot write to '{out.parent}': {error.strerror}") from None
    try:
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
            from kninfer.export.quantize import quantize_int8

            final = work / "int8.onnx"
            quantize_int8(fp32, final)
            if task == "causal-lm":
                ids = sample_ids or list(range(0, model.config.vocab_size, max(1, model.config.vocab_size // 64)))
                agreement = top1_agreement(str(fp32), str(final), _as_batch(ids))
        graph = onnx.load(str(final))
        metadata = bundle_metadata(model, task, variant, out.name)
        onnx.helper.set_model_props(graph, {k: json.dumps(v) for k, v in metadata.items()})
        staged = work / out.name
        _save(graph, staged)
        (work / "kninfer.json").write_text(json.dumps(metadata, indent=2) + "\n")
        names = [out.name, "kninfer.json"] + ([f"{out.name}.data"] if (work / f"{out.name}.data").exists() else [])
        if tokenizer_json is not None:
            (work / "tokenizer.json").write_text(tokenizer_json)
            names.append("tokenizer.json")
        for name in names:
            os.replace(work / name, out.parent / name)
        return ExportReport(out, sum((out.parent / n).stat().st_size for n in names if n.startswith(out.name)),
                            len(graph.graph.node), layers, verification, agreement)
    except OSError as error:
        raise KninferError(f"cannot write '{out}': {error.strerror or error}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


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
        "format": "kninfer-bundle", "format_version": 1, "onnx_file": onnx_file, "task": task,
        "model_type": config.model_type, "variant": variant, "context_length": config.n_positions,
        "vocab_size": config.vocab_size, "eos_token_id": eos, "bos_token_id": config.bos_token_id,
        "pad_token_id": config.pad_token_id if config.pad_token_id is not None else eos,
        "labels": labels, "glue_task": getattr(config, "glue_task", None), "kv_cache": kv,
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


def _save(graph: onnx.ModelProto, path: Path) -> None:
    large = sum(len(t.raw_data) for t in graph.graph.initializer) > EXTERNAL_DATA_BYTES
    onnx.save_model(graph, str(path), save_as_external_data=large, location=f"{path.name}.data")
