"""`kninfer compress` and `kninfer info`: build a Kronecker student and show what it holds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kninfer.cli import OverwriteOption
from kninfer.cli.output import console, print_layers


def compress(
    teacher: Annotated[str, typer.Option(help="Dense GPT-2 or Llama teacher: a hub name (gpt2), a directory, a .pt "
                                              "or a .gguf file.")],
    out: Annotated[Path, typer.Option(help="Where to write the student: a directory (HF format) or FILE.pt.")],
    preset: Annotated[str, typer.Option(help="kngpt2 (paper), krony-pt (MLP only), auto (shapes and ranks per map "
                                             "by calibrated output error; needs --calib), svd (low rank), odd-mlp (low "
                                             "rank on the odd blocks' MLP maps), drop (whole blocks, by influence "
                                             "with --calib), distil (every other layer), or a JSON spec file."
                                        )] = "kngpt2",
    tie_head: Annotated[bool | None, typer.Option(
        "--tie-head/--no-tie-head", help="LM head reuses the Kronecker embedding (A @ (H @ Bᵀ)); default: as the "
                                         "teacher (tied embeddings: tied head).", show_default=False)] = None,
    init: Annotated[str | None, typer.Option(help="calibrated (factors fitted to the teacher's outputs on --calib; "
                                                  "the default with --calib), van-loan (without), van-loan-rescaled "
                                                  "(krony-pt's default) or pruning.")] = None,
    calib: Annotated[str | None, typer.Option(help="Calibration text: a .txt/.raw file, a folder (its train split) or "
                                                   "a hub dataset name:config.")] = None,
    calib_tokens: Annotated[int, typer.Option(help="Calibration tokens read from --calib.", min=1)] = 8192,
    ratio: Annotated[float | None, typer.Option(help="krony-pt, auto, svd, odd-mlp, drop: the student's parameters "
                                                     "as a fraction of the teacher's (default 0.8; krony-pt 0.655).",
                                                min=0, max=1)] = None,
    target_params: Annotated[int | None, typer.Option(help="krony-pt, auto, svd, odd-mlp, drop: total parameters "
                                                           "to aim for (instead of --ratio).", min=1)] = None,
    rank: Annotated[int, typer.Option(help="krony-pt: Kronecker rank of each MLP map.", min=1)] = 1,
    odd_base: Annotated[int, typer.Option(help="kngpt2, odd-mlp: count layers from 0 (1, 3, 5, ...) or 1 (0, 2, "
                                               "4, ...).")] = 0,
    drop: Annotated[int, typer.Option(help="Blocks to drop before the preset factors the rest (those of least "
                                           "influence on --calib; without it spread evenly); --ratio and "
                                           "--target-params hold for the whole student.", min=0)] = 0,
    overwrite: OverwriteOption = False,
) -> None:
    """Compress a dense GPT-2 or Llama into a Kronecker student: factors from the nearest Kronecker product, or fitted
    to the teacher's outputs on calibration text (--calib)."""
    from kninfer import modeling
    from kninfer.modeling.compress import count_parameters
    from kninfer.modeling.families import dims
    from kninfer.modeling.io import check_output

    check_output(out, overwrite)
    dense, tokenizer = modeling.load(teacher)
    calibration = None
    if calib is not None:
        from kninfer.train.data import calibration_ids

        calibration = calibration_ids(calib, tokenizer, calib_tokens, min(512, dims(dense.config).context))
    with console.status(f"factoring with preset {preset}") as status:
        student, rows = modeling.compress(dense, preset, tie_head=tie_head, init=init, target_params=target_params,
                                          ratio=ratio, rank=rank, odd_base=odd_base, drop=drop,
                                          calibration=calibration, progress=status.update)
    print_layers(rows, count_parameters(dense), count_parameters(student), count_parameters(student, False))
    modeling.save(student, out, tokenizer, overwrite=overwrite)
    console.print(f"wrote {out}")


def info(model: Annotated[str, typer.Argument(help="A saved model: directory, .pt file or hub name.")]) -> None:
    """Show a model's Kronecker layers (shapes and parameters) and its totals."""
    from kninfer.modeling import load
    from kninfer.modeling.compress import count_parameters, report_rows
    from kninfer.modeling.families import dims

    loaded, _ = load(model)
    size = dims(loaded.config)
    console.print(f"{model}: {type(loaded).__name__}, {size.layers} layers, d={size.hidden}, {size.heads} heads "
                  f"({size.kv_heads} KV)")
    print_layers(report_rows(loaded), None, count_parameters(loaded), count_parameters(loaded, False))


def shapes(
    out_features: Annotated[int, typer.Argument(help="Rows of the weight (nn.Linear's out_features).")],
    in_features: Annotated[int, typer.Argument(help="Columns of the weight (nn.Linear's in_features).")],
    rank: Annotated[int, typer.Option(help="Kronecker rank.")] = 1,
    top: Annotated[int, typer.Option(help="Show this many, smallest first (0: all).")] = 20,
) -> None:
    """List the factor shapes A (m1, n1) ⊗ B (m2, n2) of an (out, in) weight with parameters and multiply-adds."""
    from rich.table import Table

    from kninfer.kron import factor_shapes

    table = Table(title=f"factor shapes of a ({out_features}, {in_features}) weight, rank {rank}")
    for column in ("A", "B", "parameters", "of dense", "multiply-adds / token"):
        table.add_column(column, justify="right")
    found = factor_shapes(out_features, in_features, rank)
    for s in found[:top or None]:
        table.add_row(f"({s.m1}, {s.n1})", f"({s.m2}, {s.n2})", f"{s.params:,}",
                      f"{s.params / (out_features * in_features):.2%}", f"{s.macs:,}")
    console.print(table)


COMMANDS = [compress, info, shapes]
