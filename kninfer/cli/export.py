"""`kninfer export`: a model to an ONNX bundle (graph, tokenizer.json, kninfer.json), verified against PyTorch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kninfer.cli.output import console
from kninfer.errors import KninferError


def export(
    model: Annotated[str, typer.Argument(help="The model: a .pt file, a Hugging Face directory or a hub name.")],
    out: Annotated[Path, typer.Argument(help="The graph to write, DIR/NAME.onnx; tokenizer.json and kninfer.json "
                                             "go beside it.")],
    task: Annotated[str, typer.Option(help="causal-lm (logits + KV cache) or sequence-classification.")] = "causal-lm",
    opset: Annotated[int, typer.Option(help="ONNX opset version (9 up to what the installed torch "
                                            "exporter supports).")] = 18,
    dense: Annotated[bool, typer.Option("--dense", help="Materialise every Kronecker weight (a dense baseline "
                                                        "for benchmarks).")] = False,
    int8: Annotated[bool, typer.Option("--int8", help="Block-wise 8-bit weights (MatMulNBits, as llama.cpp's "
                                                      "Q8_0: blocks of 32 rows, int8 compute) for the MatMul "
                                                      "weights of a block of rows or more, the head included; "
                                                      "smaller ones stay fp32.")] = False,
    int4: Annotated[bool, typer.Option("--int4", help="The same with 4-bit weights: smaller and faster, less "
                                                      "accurate.")] = False,
    int8_dynamic: Annotated[bool, typer.Option("--int8-dynamic", help="Dynamic int8 (MatMulInteger: per-channel "
                                                                      "weights, activations per tensor at run time) "
                                                                      "of every MatMul weight: faster on some "
                                                                      "graphs, much less accurate where activations "
                                                                      "have outliers (SmolLM2).")] = False,
    verify: Annotated[bool, typer.Option(help="Compare onnxruntime with PyTorch (prefill + 3 cached steps) and "
                                              "fail when max |Δlogits| is above its tolerance.")] = True,
    tokenizer: Annotated[Path | None, typer.Option(help="Tokenizer to bundle: a directory or a tokenizer.json "
                                                        "(default: the model's own).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a .onnx or kninfer.json in the folder that kninfer.json "
                                                 "does not list (files kninfer did not write).")] = False,
    fused_attention: Annotated[bool, typer.Option(help="Each layer's attention core as one onnxruntime contrib op "
                                                       "(GroupQueryAttention for Llama, MultiHeadAttention for "
                                                       "GPT-2); --no-fused-attention traces MatMul/Softmax.")] = True,
) -> None:
    """Export a model to ONNX with its Kronecker layers kept factored, and write the bundle beside it."""
    chosen = [name for name, flag in (("dense", dense), ("int8", int8), ("int4", int4),
                                      ("int8-dynamic", int8_dynamic)) if flag]
    if len(chosen) > 1:
        raise KninferError(f"{' and '.join(f'--{name}' for name in chosen)} are exclusive: pick one variant")
    from kninfer.export import export as run

    variant = chosen[0] if chosen else "fp32"
    with console.status(f"exporting {model} ({task}, {variant})"):
        run(model, out, task=task, variant=variant, opset=opset, tokenizer=tokenizer, verify=verify,
            overwrite=overwrite, fused_attention=fused_attention, log=console.print)


COMMANDS = [export]
