"""export(model, out): a model, or where to load it from, to a verified ONNX bundle with its tokenizer."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch.onnx._constants import ONNX_MAX_OPSET  # the exporter's own bound; no public name for it
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from kninfer.errors import KninferError
from kninfer.export.bundle import ExportReport, export_bundle
from kninfer.modeling.io import load

MIN_OPSET = 9  # the traced graph's Range (position ids) has no ONNX form below opset 9
SAMPLE_TEXT = (  # what a quantized graph's top-1 agreement with fp32 is measured on
    "The history of the city begins in the early nineteenth century, when a small group of settlers built "
    "a mill beside the river. Within fifty years the town had grown into a busy market for the farms around it."
)


def export(
    model: PreTrainedModel | str | Path, out: str | Path, *, task: str = "causal-lm", variant: str = "fp32",
    opset: int = 18, tokenizer: PreTrainedTokenizerBase | str | Path | None = None, verify: bool = True,
    overwrite: bool = False, fused_attention: bool = True, log: Callable[[str], object] = print,
) -> ExportReport:
    """Export `model` (an object, a .pt file, a Hugging Face directory or a hub name) to `out` (DIR/NAME.onnx).

    The bundle gets `tokenizer` (an object, a directory or a tokenizer.json; default: the one saved with a loaded
    model) and its chat template for `kninfer chat` (an object's, or a directory's chat_template.jinja or
    tokenizer_config.json's; the "default" one of several). `variant`: fp32, dense (every Kronecker weight
    materialised), int8, int4 or int8-dynamic (export/quantize.py). With `verify`, onnxruntime's logits must match
    PyTorch's within TOLERANCE times their RMS, at least TOLERANCE (prefill + cached steps). `overwrite` replaces
    files in the folder that its kninfer.json does not list. `fused_attention`: each layer's attention core as one
    onnxruntime contrib node (GroupQueryAttention for Llama, MultiHeadAttention for GPT-2; docs/architecture.md,
    "ONNX graph rules"); False traces it to MatMul/Softmax as transformers writes it.
    """
    _check_opset(opset)
    out = Path(out)
    if out.suffix != ".onnx":
        raise KninferError(f"'{out}': the output must be a .onnx file")
    loaded, own_tokenizer = (model, None) if isinstance(model, PreTrainedModel) else load(model)
    tokenizer = own_tokenizer if tokenizer is None else tokenizer
    tokenizer_json = _tokenizer_json(tokenizer)
    sample = _sample_ids(tokenizer_json)
    report = export_bundle(loaded, out, task=task, variant=variant, opset=opset, tokenizer_json=tokenizer_json,
                           verify=verify, sample_ids=sample, overwrite=overwrite,
                           chat_template=_chat_template(tokenizer), fused_attention=fused_attention)
    log(f"wrote {report.onnx_path}: {report.bytes / 1e6:.1f} MB, {report.nodes:,} nodes, "
        f"{report.kronecker_layers} Kronecker layers")
    if report.verification is None:
        log("verification skipped (--no-verify)")
    else:
        log(f"verified: max |Δlogits| onnxruntime vs PyTorch = {report.verification.max_abs_diff:.2e} "
            f"(≤ {report.verification.bound:.3g}, prefill + {report.verification.steps} cached steps)")
    if report.agreement is not None:
        source = "a sample text" if sample else "sample token ids"
        log(f"{variant} top-1 next-token agreement with fp32 on {source}: {report.agreement:.1%}")
    if not tokenizer_json:
        log("no tokenizer bundled: pass --tokenizer DIR|tokenizer.json to add one")
    return report


def _check_opset(opset: int) -> None:
    """Refuse an opset the exporter cannot write before loading the model (it fails late, with a traceback)."""
    if not MIN_OPSET <= opset <= ONNX_MAX_OPSET:
        raise KninferError(f"--opset {opset}: expected {MIN_OPSET} to {ONNX_MAX_OPSET} (the lowest this graph "
                           f"needs, the highest torch {torch.__version__} exports)")


def read_tokenizer(path: str | Path) -> str:
    """The fast tokenizer JSON from a tokenizer.json file or a tokenizer directory."""
    path = Path(path)
    try:
        if path.is_file():
            return Tokenizer.from_file(str(path)).to_str()
        if (path / "tokenizer.json").is_file():
            return Tokenizer.from_file(str(path / "tokenizer.json")).to_str()
        return AutoTokenizer.from_pretrained(str(path)).backend_tokenizer.to_str()
    except Exception as error:  # tokenizers and transformers raise many types for a bad file
        raise KninferError(f"'{path}' is not a readable tokenizer: {str(error).splitlines()[0]}") from None


def _tokenizer_json(tokenizer: PreTrainedTokenizerBase | str | Path | None) -> str | None:
    """The fast tokenizer JSON of a tokenizer object, directory or tokenizer.json file (None for None)."""
    if tokenizer is None:
        return None
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer.backend_tokenizer.to_str()
    return read_tokenizer(tokenizer)


def _chat_template(tokenizer: PreTrainedTokenizerBase | str | Path | None) -> str | None:
    """The chat template of a tokenizer object or directory (None for a tokenizer.json, or without one); of several
    named templates, the "default" one."""
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        template = tokenizer.chat_template
    elif tokenizer is not None and Path(tokenizer).is_dir():
        template = _saved_chat_template(Path(tokenizer))
    else:
        return None
    return template.get("default") if isinstance(template, dict) else template


def _saved_chat_template(folder: Path) -> str | dict[str, str] | None:
    """A tokenizer folder's chat template as transformers reads it: chat_template.jinja, else tokenizer_config.json's
    "chat_template" (a string, or a list of {"name", "template"} objects)."""
    jinja_file, config_file = folder / "chat_template.jinja", folder / "tokenizer_config.json"
    try:
        if jinja_file.is_file():
            return jinja_file.read_text(encoding="utf-8")
        if not config_file.is_file():
            return None
        template = json.loads(config_file.read_text(encoding="utf-8")).get("chat_template")
        return {entry["name"]: entry["template"] for entry in template} if isinstance(template, list) else template
    except (ValueError, LookupError, TypeError, AttributeError) as error:  # not UTF-8 or JSON, not transformers' layout
        raise KninferError(f"cannot read the chat template in '{folder}': {error}") from None


def _sample_ids(tokenizer_json: str | None) -> list[int] | None:
    """SAMPLE_TEXT's token ids under the bundle's tokenizer (None without one)."""
    return Tokenizer.from_str(tokenizer_json).encode(SAMPLE_TEXT).ids if tokenizer_json else None
