"""`kninfer pretrain`: train a small GPT-2 teacher from scratch (the embedded default is made with it)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kninfer.cli import MAX_SEED, OverwriteOption, above_zero
from kninfer.cli.output import console


def pretrain(
    data: Annotated[str, typer.Option(help="Training text: a .txt/.raw file, a folder with train/valid files, "
                                           "or a hub dataset such as wikitext:wikitext-2-raw-v1.")],
    out: Annotated[Path, typer.Option(help="Output directory (Hugging Face format, with tokenizer and log).")],
    n_layer: Annotated[int, typer.Option(help="Layers (even, so kngpt2's odd-layer preset applies).", min=1)] = 4,
    n_embd: Annotated[int, typer.Option(help="Hidden size (a multiple of --n-head).", min=1)] = 256,
    n_head: Annotated[int, typer.Option(help="Attention heads.", min=1)] = 4,
    vocab_size: Annotated[int, typer.Option(help="Size of the byte-level BPE vocabulary trained on the data.",
                                            min=1)] = 8192,
    block_size: Annotated[int, typer.Option(help="Context length in tokens.", min=2)] = 256,
    epochs: Annotated[float, typer.Option(help="Passes over the training text.", callback=above_zero)] = 1.0,
    max_steps: Annotated[int, typer.Option(help="Stop after this many steps (-1: run the epochs).")] = -1,
    batch_size: Annotated[int, typer.Option(help="Blocks per step.", min=1)] = 16,
    lr: Annotated[float, typer.Option(help="Peak learning rate (cosine schedule, 5% warm-up).",
                                      callback=above_zero)] = 1e-3,
    seed: Annotated[int, typer.Option(help="Random seed.", min=0, max=MAX_SEED)] = 0,
    dtype: Annotated[str, typer.Option(help="Dtype of the saved weights: float32 or float16.")] = "float32",
    overwrite: OverwriteOption = False,
) -> None:
    """Train a GPT-2 language model and its tokenizer from scratch (plain causal-LM loss, HF Trainer)."""
    from kninfer.train import pretrain as run

    try:
        run(data, out, n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab_size, block_size=block_size,
            epochs=epochs, max_steps=max_steps, batch_size=batch_size, lr=lr, seed=seed, dtype=dtype,
            overwrite=overwrite)
    except KeyboardInterrupt:  # TrainingInterrupted (a checkpoint was saved), or a second Ctrl-C
        console.print(f"interrupted: run the same command to continue from the last checkpoint in {out}.checkpoints")
        raise typer.Exit(130) from None


COMMANDS = [pretrain]
