"""`kninfer demo`: the whole pipeline on the embedded teacher, offline, in a few minutes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kninfer.cli import MAX_SEED, OverwriteOption, above_zero
from kninfer.cli.output import console


def demo(
    out: Annotated[Path, typer.Option(help="Folder for everything the demo writes.")] = Path("demo-out"),
    teacher: Annotated[str | None, typer.Option(help="Dense GPT-2 teacher (hub name such as gpt2, dir or .pt); "
                                                     "default: the embedded SOTU teacher.")] = None,
    data: Annotated[str | None, typer.Option(help="Distillation text (file, folder or hub dataset); default: "
                                                  "text sampled from the teacher (data-free).")] = None,
    steps: Annotated[int, typer.Option(help="ILKD distillation steps.", min=1)] = 300,
    block_size: Annotated[int, typer.Option(help="Tokens per training block.", min=2)] = 128,
    batch_size: Annotated[int, typer.Option(help="Blocks per step.", min=1)] = 8,
    lr: Annotated[float, typer.Option(help="Peak learning rate.", callback=above_zero)] = 1e-3,
    prompt: Annotated[str, typer.Option(help="Prompt for the generation at the end.")] =
        "The state of the Union is",
    eval_text: Annotated[Path | None, typer.Option(help="Held-out text for perplexity; default: the embedded "
                                                        "held-out SOTU address.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.", min=0, max=MAX_SEED)] = 0,
    overwrite: OverwriteOption = False,
) -> None:
    """Compress the teacher (kngpt2, tied head), distil it with ILKD, export both to ONNX, generate, compare."""
    from rich.table import Table

    from kninfer.demo import run_demo
    from kninfer.train import TrainingInterrupted

    try:
        rows = run_demo(out, teacher, data, steps, block_size, batch_size, lr, prompt, eval_text, seed,
                        log=console.print, overwrite=overwrite)
    except TrainingInterrupted as stop:
        console.print(f"demo interrupted at distillation step {stop.step}; nothing was written to {out}/student")
        raise typer.Exit(130) from None
    table = Table(title=f"kninfer demo ({out})")
    for column in ("model", "parameters", "ONNX MB", "ms/token (ORT)", "held-out perplexity"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in rows:
        table.add_row(row.name, f"{row.parameters:,}", "" if row.onnx_mb is None else f"{row.onnx_mb:.1f}",
                      "" if row.ms_per_token is None else f"{row.ms_per_token:.2f}", f"{row.perplexity:.1f}")
    console.print(table)


COMMANDS = [demo]
