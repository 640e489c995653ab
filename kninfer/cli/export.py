"""`kninfer export`: a model to an ONNX bundle (graph, tokenizer.json, kninfer.json), verified against PyTorch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kninfer.cli.output import console
from kninfer.errors import KninferError

MIN_OPSET = 9  # the traced graph's Range (position ids) has no ONNX form below opset 9
SAMPLE_TEXT = (
    "The history of the city begins in the early nineteenth century, when a small group of settlers built "
    "a mill beside the river. Within fifty years the town had grown into a busy market for the farms around it."
)


def export(
    model: Annotated[str, typer.Argument(help="The model: a .pt file, a Hugging Face directory or a hub name.")],
    out: Annotated[Path, typer.Argument(help="The graph to write, DIR/NAME.onnx; tokenizer.json and kninfer.json "
                                             "go beside it.")],
    task: Annotated[str, typer.Option(help="causal-lm (logits + KV cache) or sequence-classification.")] = "causal-lm",
    opset: Annotated[int, typer.Option(help=f"ONNX opset version ({MIN_OPSET} up to what the installed torch "
                                            "exporter supports).")] = 18,
    dense: Annotated[bool, typer.Option("--dense", help="Materialise every Kronecker weight (a dense baseline "
                                                        "for benchmarks).")] = False,
    int8: Annotated[bool, typer.Option("--int8", help="Dynamic int8 quantization of the MatMul weights, per "
                                                      "channel, the head included.")] = False,
    verify: Annotated[bool, typer.Option(help="Compare onnxruntime with PyTorch (prefill + 3 cached steps) and "
                                              "fail above 1e-4.")] = True,
    tokenizer: Annotated[Path | None, typer.Option(help="Tokenizer to bundle: a directory or a tokenizer.json "
                                                        "(default: the model's own).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a .onnx or kninfer.json in the folder that kninfer.json "
                                                 "does not list (files kninfer did not write).")] = False,
) -> None:
    """Export a model to ONNX with its Kronecker layers kept factored, and write the bundle beside it."""
    from kninfer.export import export_bundle
    from kninfer.modeling.io import load

    if dense and int8:
        raise KninferError("--dense and --int8 are exclusive: pick one variant")
    _check_opset(opset)
    if out.suffix != ".onnx":
        raise KninferError(f"'{out}': the output must be a .onnx file")
    loaded, own_tokenizer = load(model)
    if tokenizer is not None:
        tokenizer_json = read_tokenizer(tokenizer)
    else:
        tokenizer_json = own_tokenizer.backend_tokenizer.to_str() if own_tokenizer is not None else None
    sample = None
    if tokenizer_json:
        from tokenizers import Tokenizer

        sample = Tokenizer.from_str(tokenizer_json).encode(SAMPLE_TEXT).ids
    variant = "dense" if dense else "int8" if int8 else "fp32"
    with console.status(f"exporting {model} ({task}, {variant})"):
        report = export_bundle(loaded, out, task=task, variant=variant, opset=opset,
                               tokenizer_json=tokenizer_json, verify=verify, sample_ids=sample,
                               overwrite=overwrite)
    console.print(f"wrote {report.onnx_path}: {report.bytes / 1e6:.1f} MB, {report.nodes:,} nodes, "
                  f"{report.kronecker_layers} Kronecker layers")
    if report.verification is None:
        console.print("verification skipped (--no-verify)")
    else:
        console.print(f"verified: max |Δlogits| onnxruntime vs PyTorch = {report.verification.max_abs_diff:.2e} "
                      f"(≤ 1e-4, prefill + {report.verification.steps} cached steps)")
    if report.int8_agreement is not None:
        source = "a sample text" if sample else "sample token ids"
        console.print(f"int8 top-1 next-token agreement with fp32 on {source}: {report.int8_agreement:.1%}")
    if not tokenizer_json:
        console.print("no tokenizer bundled: pass --tokenizer DIR|tokenizer.json to add one")


def _check_opset(opset: int) -> None:
    """Refuse an opset the exporter cannot write before loading the model (it fails late, with a traceback)."""
    import torch
    from torch.onnx._constants import ONNX_MAX_OPSET  # the exporter's own bound; no public name for it

    if not MIN_OPSET <= opset <= ONNX_MAX_OPSET:
        raise KninferError(f"--opset {opset}: expected {MIN_OPSET} to {ONNX_MAX_OPSET} (the lowest this graph "
                           f"needs, the highest torch {torch.__version__} exports)")


def read_tokenizer(path: Path) -> str:
    """The fast tokenizer JSON from a tokenizer.json file or a tokenizer directory."""
    from tokenizers import Tokenizer

    try:
        if path.is_file():
            return Tokenizer.from_file(str(path)).to_str()
        if (path / "tokenizer.json").is_file():
            return Tokenizer.from_file(str(path / "tokenizer.json")).to_str()
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path)).backend_tokenizer.to_str()
    except Exception as error:  # tokenizers and transformers raise many types for a bad file
        raise KninferError(f"'{path}' is not a readable tokenizer: {str(error).splitlines()[0]}") from None


COMMANDS = [export]
