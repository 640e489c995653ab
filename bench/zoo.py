"""The standard benchmark set, built from GPT-2 small's configuration with random weights (needs the train extra).

Speed does not depend on the weights' values, so nothing is downloaded. Each model lands in its own folder
under the output directory; a folder that is already complete is reused (pass `rebuild` to remake it).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from kninfer.atomic import atomic_path
from kninfer.export.bundle import bundle_metadata, export_bundle, quantize_bundle
from kninfer.modeling.compress import compress
from kninfer.modeling.io import save
from kninfer.runtime.bundle import describe_models, read_bundle

# (name, preset, tie_head): the order is the order of the tables
STUDENTS = [("gpt2", None, False), ("kngpt2", "kngpt2", False), ("kngpt2-tied", "kngpt2", True),
            ("krony-pt", "krony-pt", False), ("distil", "distil", False)]
TORCH_MODELS = ("gpt2", "kngpt2")
REFERENCE = "gpt2-fp32"


def build_zoo(out: Path, tokenizer_json: str, rebuild: bool = False,
              progress: Callable[[str], None] = print) -> list[dict[str, str]]:
    """Export every zoo model (fp32 and int8) and save the torch models; returns [{name, path, runtime}]."""
    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(GPT2Config()).eval()
    entries = []
    for name, preset, tie_head in STUDENTS:
        model = teacher if preset is None else compress(teacher, preset, tie_head=tie_head)[0].eval()
        fp32, int8 = out / f"{name}-fp32", out / f"{name}-int8"
        if rebuild or _missing(fp32):
            progress(f"exporting {name} fp32")
            export_bundle(model, fp32 / "model.onnx", tokenizer_json=tokenizer_json, verify=False)
        if rebuild or _missing(int8):
            progress(f"quantizing {name} int8")
            quantize_bundle(fp32 / "model.onnx", int8 / "model.onnx")
        entries += [_entry(fp32), _entry(int8)]
        if preset is None:
            for variant in ("fp32", "int8"):
                folder = out / f"optimum-gpt2-{variant}"
                if rebuild or _missing(folder):
                    progress(f"exporting gpt2 with optimum-onnx ({variant})")
                    optimum_bundle(teacher, folder, variant, out / "optimum-gpt2-fp32", tokenizer_json)
                entries.append(_entry(folder))
        if name in TORCH_MODELS:
            folder = out / f"torch-{name}"
            if rebuild or not (folder / "config.json").is_file():
                progress(f"saving {name} for PyTorch eager")
                save(model, folder, overwrite=True)  # the zoo folder is the bench's own cache
            entries.append({"name": folder.name, "path": str(folder), "runtime": "torch"})
    return entries


def _missing(folder: Path) -> bool:
    return not (folder / "kninfer.json").is_file()


def _entry(folder: Path) -> dict[str, str]:
    return {"name": folder.name, "path": str(read_bundle(folder).onnx_path), "runtime": "onnxruntime"}


def optimum_bundle(teacher: GPT2LMHeadModel, out: Path, variant: str, fp32_folder: Path, tokenizer_json: str) -> None:
    """optimum-onnx's own export (text-generation-with-past) of the dense model, and for int8 its ORTQuantizer
    (dynamic, per channel): the anchor a user would pick instead; kninfer.json is added so the runtime reads it."""
    from optimum.exporters.onnx import onnx_export_from_model

    with atomic_path(out, directory=True, kind="optimum-bundle", overwrite=True) as work:
        if variant == "fp32":
            onnx_export_from_model(teacher, work, task="text-generation-with-past", do_validation=False)
            onnx_file = "model.onnx"
        else:
            from optimum.onnxruntime import ORTQuantizer
            from optimum.onnxruntime.configuration import AutoQuantizationConfig

            quantizer = ORTQuantizer.from_pretrained(fp32_folder, file_name="model.onnx")
            quantizer.quantize(AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True), save_dir=work)
            onnx_file = "model_quantized.onnx"
        (work / "tokenizer.json").write_text(tokenizer_json)
        metadata = bundle_metadata(teacher, "causal-lm", variant)
        data_file = f"{onnx_file}_data"  # optimum's name, written only past the 2 GB protobuf limit
        metadata["onnx_data_file"] = data_file if (work / data_file).exists() else None
        metadata["tokenizer_file"] = "tokenizer.json"
        (work / "kninfer.json").write_text(describe_models({onnx_file: metadata}))
