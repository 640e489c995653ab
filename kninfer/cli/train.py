"""`kninfer distill`, `finetune`, `eval-lm`, `eval-glue`: recover a compressed model's quality and measure it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from kninfer.cli import MAX_SEED, OverwriteOption, above_zero, check_output_file
from kninfer.cli.output import console
from kninfer.errors import KninferError

KD_HELP = "ilkd (paper: embedding, attention, hidden states, CE), vanilla (soft targets + CE) or none (CE only)."
ALPHAS_HELP = ("Weights of the KD mode's terms, comma-separated: ilkd embedding,attention,hidden,ce; vanilla kd,ce "
               "(0.5,0.5). 'paper': the paper's (ilkd 0.5,0.5,0.5,0.1 pre-training, 0.5,0.5,0.5,0.02 fine-tuning, "
               "hidden states by MSE). Default: the paper's, except ILKD pre-training: kninfer's 0,0,1,1 with the "
               "hidden term as relative error ‖s−t‖²/‖t‖² (the paper's starves CE in short runs).")

Checkpoints = Annotated[Path | None, typer.Option(help="Checkpoint folder (default: OUT.checkpoints).")]
Resume = Annotated[bool, typer.Option(help="Continue from the last checkpoint in the checkpoint folder.")]
Precision = Annotated[str, typer.Option(help="fp32, bf16 or fp16 (mixed precision on a GPU).")]
Seed = Annotated[int, typer.Option(help="Random seed (data order, dropout, new heads).", min=0, max=MAX_SEED)]
MaxSteps = Annotated[int, typer.Option(help="Stop after this many optimizer steps (-1: run the epochs).")]
Accumulate = Annotated[int, typer.Option(help="Gradient accumulation steps.", min=1)]
LoggingSteps = Annotated[int, typer.Option(help="Log the loss and each of its terms every N steps.", min=1)]
SaveSteps = Annotated[int, typer.Option(help="Save a resumable checkpoint every N steps.", min=1)]
Temperature = Annotated[float, typer.Option(help="Soft-target temperature for --kd vanilla.", callback=above_zero)]
LearningRate = Annotated[float, typer.Option(help="Peak learning rate (linear decay).", callback=above_zero)]


def _alphas(text: str | None) -> list[float] | str | None:
    """--alphas as numbers, in the KD mode's term order (the API checks the count), or "paper"."""
    if text is None or text == "paper":
        return text
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise KninferError(f"--alphas '{text}': expected 'paper' or comma-separated numbers") from None


@contextmanager
def _resumable() -> Iterator[None]:
    """Ctrl-C or SIGTERM stopped the training at a checkpoint: say how to continue, exit 130 (no --out)."""
    from kninfer.train import TrainingInterrupted

    try:
        yield
    except TrainingInterrupted as stop:
        console.print(f"interrupted at step {stop.step}: checkpoint in {stop.checkpoints}; "
                      "run the same command with --resume to continue")
        raise typer.Exit(130) from None


def distill(
    student: Annotated[str, typer.Option(
        help="Student to train: a Kronecker (or layer-dropped) student from `kninfer compress` (dir or .pt).")],
    data: Annotated[str, typer.Option(help="Training text: a .txt/.raw file, a folder of them, or hub "
                                           "dataset:config (wikitext:wikitext-103-raw-v1).")],
    out: Annotated[Path, typer.Option(help="Where to write the trained student: a directory or FILE.pt.")],
    teacher: Annotated[str | None, typer.Option(help="The dense teacher (hub name, dir, .pt or .gguf).")] = None,
    kd: Annotated[str, typer.Option(help=KD_HELP)] = "ilkd",
    alphas: Annotated[str | None, typer.Option(help=ALPHAS_HELP)] = None,
    temperature: Temperature = 2.0,
    block_size: Annotated[int, typer.Option(help="Tokens per training block.", min=2)] = 256,
    batch_size: Annotated[int, typer.Option(help="Blocks per device per step.", min=1)] = 8,
    lr: LearningRate = 1e-4,
    factor_lr: Annotated[float | None, typer.Option(
        help="Peak learning rate of the Kronecker factors alone (default: --lr).", callback=above_zero)] = None,
    epochs: Annotated[float, typer.Option(help="Passes over the data (when --max-steps is -1).",
                                          callback=above_zero)] = 1.0,
    max_steps: MaxSteps = -1,
    max_samples: Annotated[int | None, typer.Option(help="Use at most this many blocks.", min=1)] = None,
    fraction: Annotated[float | None, typer.Option(help="Use this fraction of the text rows (paper: 0.1).")] = None,
    grad_accum: Accumulate = 1,
    logging_steps: LoggingSteps = 10,
    save_steps: SaveSteps = 500,
    precision: Precision = "fp32",
    checkpoints: Checkpoints = None,
    resume: Resume = False,
    overwrite: OverwriteOption = False,
    seed: Seed = 0,
) -> None:
    """Pre-train a compressed student on text by distilling a teacher (ILKD by default, as the paper)."""
    from kninfer.train import distill as run

    with _resumable():
        run(student, data, teacher=teacher, kd=kd, alphas=_alphas(alphas), temperature=temperature,
            block_size=block_size, batch_size=batch_size, lr=lr, factor_lr=factor_lr, epochs=epochs,
            max_steps=max_steps, max_samples=max_samples, fraction=fraction, grad_accum=grad_accum,
            logging_steps=logging_steps, save_steps=save_steps, out=out, checkpoints=checkpoints, resume=resume,
            overwrite=overwrite, seed=seed, precision=precision, log=console.print)


def finetune(
    model: Annotated[str, typer.Option(help="Model to fine-tune: a causal LM (dir, .pt or hub name) or a classifier.")],
    task: Annotated[str, typer.Option(help="GLUE task: cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte.")],
    out: Annotated[Path, typer.Option(help="Where to write the classifier: a directory or FILE.pt.")],
    data_dir: Annotated[str | None, typer.Option(help="GLUE folder in the original layout (SST-2/train.tsv...); "
                                                      "default: the hub's glue dataset.")] = None,
    teacher: Annotated[str | None, typer.Option(help="A classifier already fine-tuned on this task.")] = None,
    kd: Annotated[str | None, typer.Option(help=KD_HELP + " Default: ilkd with --teacher, else none.")] = None,
    alphas: Annotated[str | None, typer.Option(help=ALPHAS_HELP)] = None,
    temperature: Temperature = 2.0,
    max_length: Annotated[int, typer.Option(help="Truncate inputs to this many tokens.", min=1)] = 128,
    batch_size: Annotated[int, typer.Option(help="Examples per device per step.", min=1)] = 32,
    lr: LearningRate = 5e-5,
    epochs: Annotated[float, typer.Option(help="Passes over the training split (when --max-steps is -1).",
                                          callback=above_zero)] = 3.0,
    max_steps: MaxSteps = -1,
    max_samples: Annotated[int | None, typer.Option(help="Train on the first N rows only.", min=1)] = None,
    grad_accum: Accumulate = 1,
    logging_steps: LoggingSteps = 10,
    save_steps: SaveSteps = 500,
    precision: Precision = "fp32",
    checkpoints: Checkpoints = None,
    resume: Resume = False,
    overwrite: OverwriteOption = False,
    seed: Seed = 0,
) -> None:
    """Fine-tune on a GLUE task (plain CE, or KD from a fine-tuned teacher), then score the dev split(s)."""
    from kninfer.runtime.tasks import get_task

    get_task(task)  # before the heavy imports: a typo fails at once
    from kninfer.train import finetune as run

    with _resumable():
        run(model, task, data_dir=data_dir, teacher=teacher, kd=kd, alphas=_alphas(alphas), temperature=temperature,
            max_length=max_length, batch_size=batch_size, lr=lr, epochs=epochs, max_steps=max_steps,
            max_samples=max_samples, grad_accum=grad_accum, logging_steps=logging_steps, save_steps=save_steps,
            out=out, checkpoints=checkpoints, resume=resume, overwrite=overwrite, seed=seed, precision=precision,
            log=console.print)


def eval_lm(
    model: Annotated[str, typer.Argument(help="A causal LM: directory, .pt file or hub name.")],
    data: Annotated[str, typer.Option(help="Text: a .txt/.raw file, a folder, or hub dataset:config.")],
    split: Annotated[str, typer.Option(help="Split to score (files in a folder are matched by this name).")] = "test",
    block_size: Annotated[int | None, typer.Option(help="Window length (default: the model's context).")] = None,
    stride: Annotated[int | None, typer.Option(help="Window step; the overlap is context only "
                                                    "(default: half the window).")] = None,
    out: Annotated[Path | None, typer.Option(help="Also write the result as JSON here.")] = None,
) -> None:
    """Sliding-window perplexity of a causal LM on a text (rows joined by blank lines, as the HF recipe)."""
    if out is not None:
        check_output_file(out)
    from kninfer.train import lm_perplexity

    lm_perplexity(model, data, split=split, block_size=block_size, stride=stride, out=out, log=console.print)


def eval_glue(
    model: Annotated[str, typer.Argument(help="A classifier from `kninfer finetune` (directory or .pt).")],
    task: Annotated[str, typer.Option(help="GLUE task: cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte.")],
    data_dir: Annotated[str | None, typer.Option(help="GLUE folder in the original layout; default: the hub.")] = None,
    out: Annotated[Path | None, typer.Option(help="Write the metrics as JSON here.")] = None,
    max_length: Annotated[int | None, typer.Option(help="Truncate inputs to this many tokens (default: the length "
                                                         "the classifier was fine-tuned on, else 128).",
                                                    min=1)] = None,
    batch_size: Annotated[int, typer.Option(help="Examples per forward pass.", min=1)] = 32,
) -> None:
    """Score a fine-tuned classifier on a GLUE task's dev split(s) (MNLI: matched and mismatched)."""
    from kninfer.runtime.tasks import get_task

    get_task(task)
    if out is not None:
        check_output_file(out)
    from kninfer.train import evaluate_glue

    evaluate_glue(model, task, data_dir=data_dir, max_length=max_length, batch_size=batch_size, out=out,
                  log=console.print)


COMMANDS = [distill, finetune, eval_lm, eval_glue]
