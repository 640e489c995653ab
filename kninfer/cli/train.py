"""`kninfer distill`, `finetune`, `eval-lm`, `eval-glue`: recover a compressed model's quality and measure it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from kninfer.cli import MAX_SEED, OverwriteOption, above_zero, check_output_file, write_output
from kninfer.cli.output import console
from kninfer.errors import KninferError

KD_HELP = "ilkd (paper: embedding, attention, hidden states, CE), vanilla (soft targets + CE) or none (CE only)."
ALPHAS_HELP = ("Comma-separated weights of the KD mode's terms: ilkd embedding,attention,hidden,ce "
               "(default 0.5,0.5,0.5,0.1 pre-training, 0.5,0.5,0.5,0.02 fine-tuning); vanilla kd,ce (0.5,0.5).")
PRECISIONS = {"fp32": {}, "bf16": {"bf16": True}, "fp16": {"fp16": True}}

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


def _alphas(text: str | None, kd: str, finetune: bool) -> dict[str, float]:
    from kninfer.train.losses import TERMS, default_alphas

    if kd not in TERMS:
        raise KninferError(f"unknown --kd '{kd}': expected one of {', '.join(TERMS)}")
    if text is None:
        return default_alphas(kd, finetune)
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise KninferError(f"--alphas '{text}': expected comma-separated numbers") from None
    if len(values) != len(TERMS[kd]):
        raise KninferError(f"--alphas '{text}': --kd {kd} takes {len(TERMS[kd])} ({','.join(TERMS[kd])})")
    return dict(zip(TERMS[kd], values, strict=True))


def _training_options(precision: str, seed: int, **options: Any) -> dict[str, Any]:
    if precision not in PRECISIONS:
        raise KninferError(f"unknown --precision '{precision}': expected one of {', '.join(PRECISIONS)}")
    return {"seed": seed, **PRECISIONS[precision], **options}


def _fits_context(model, option: str, length: int) -> None:
    """Refuse a sequence length beyond the model's context (its position embeddings end there)."""
    if length > model.config.n_positions:
        raise KninferError(f"{option} {length} exceeds the model's context of {model.config.n_positions}")


def _is_classifier(model) -> bool:
    """Whether `model` is a sequence classifier (`kninfer finetune` output), not a causal LM."""
    return any(a.endswith("ForSequenceClassification") for a in model.config.architectures or [])


def _fit_and_save(model, dataset, out: Path, tokenizer, checkpoints: Path | None, overwrite: bool,
                  **fit_options: Any) -> None:
    """Train, then save to `out`; after Ctrl-C or SIGTERM, say where the checkpoint is and exit 130 (no `out`)."""
    from kninfer.modeling.io import check_output, save
    from kninfer.train.trainer import fit

    check_output(out, overwrite)  # a refused --out fails now, not after the training
    checkpoints = checkpoints or out.with_name(out.name + ".checkpoints")
    trainer = fit(model, dataset, checkpoints, **fit_options)
    if trainer.interrupt.requested:
        console.print(f"interrupted at step {trainer.state.global_step}: checkpoint in {checkpoints}; "
                      "run the same command with --resume to continue")
        raise typer.Exit(130)
    save(trainer.model, out, tokenizer, overwrite=overwrite)
    console.print(f"wrote {out}")


def _write_json(payload: dict[str, Any], out: Path) -> None:
    write_output(out, json.dumps(payload, indent=1) + "\n")


def distill(
    student: Annotated[str, typer.Option(help="Student to train: a KnGPT2 from `kninfer compress` (dir or .pt).")],
    data: Annotated[str, typer.Option(help="Training text: a .txt/.raw file, a folder of them, or hub "
                                           "dataset:config (wikitext:wikitext-103-raw-v1).")],
    out: Annotated[Path, typer.Option(help="Where to write the trained student: a directory or FILE.pt.")],
    teacher: Annotated[str | None, typer.Option(help="The dense teacher (hub name, dir or .pt).")] = None,
    kd: Annotated[str, typer.Option(help=KD_HELP)] = "ilkd",
    alphas: Annotated[str | None, typer.Option(help=ALPHAS_HELP)] = None,
    temperature: Temperature = 2.0,
    block_size: Annotated[int, typer.Option(help="Tokens per training block.", min=2)] = 256,
    batch_size: Annotated[int, typer.Option(help="Blocks per device per step.", min=1)] = 8,
    lr: LearningRate = 1e-4,
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
    from transformers import default_data_collator

    from kninfer.modeling.io import load
    from kninfer.train.data import lm_blocks, load_lm_text

    weights = _alphas(alphas, kd, finetune=False)
    if kd != "none" and teacher is None:
        raise KninferError(f"--kd {kd} needs --teacher")
    options = _training_options(precision, seed, per_device_train_batch_size=batch_size, learning_rate=lr,
                                num_train_epochs=epochs, max_steps=max_steps, gradient_accumulation_steps=grad_accum,
                                logging_steps=logging_steps, save_steps=save_steps)
    model, tokenizer = load(student)
    teacher_model, teacher_tokenizer = load(teacher) if teacher else (None, None)
    tokenizer = tokenizer or teacher_tokenizer
    if tokenizer is None:
        raise KninferError("neither the student nor the teacher has a tokenizer saved with it")
    _fits_context(model, "--block-size", block_size)
    blocks = lm_blocks(load_lm_text(data, "train"), tokenizer, block_size, max_samples, fraction)
    console.print(f"{len(blocks):,} blocks of {block_size} tokens; kd={kd} alphas={weights}")
    _fit_and_save(model, blocks, out, tokenizer, checkpoints, overwrite,
                  teacher=teacher_model if kd != "none" else None,
                  kd=kd, alphas=weights, temperature=temperature, collator=default_data_collator, resume=resume,
                  **options)


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

    glue_task = get_task(task)  # before the heavy imports: a typo fails at once

    import torch
    from transformers import DataCollatorWithPadding

    from kninfer.modeling.io import load
    from kninfer.train.glue import as_classifier, evaluate, load_glue, tokenize, with_pad_token

    kd = kd or ("ilkd" if teacher else "none")
    weights = _alphas(alphas, kd, finetune=True)
    if kd != "none" and teacher is None:
        raise KninferError(f"--kd {kd} needs --teacher (a classifier fine-tuned on {glue_task.name})")
    options = _training_options(precision, seed, per_device_train_batch_size=batch_size, learning_rate=lr,
                                num_train_epochs=epochs, max_steps=max_steps, gradient_accumulation_steps=grad_accum,
                                logging_steps=logging_steps, save_steps=save_steps)
    dense, tokenizer = load(model)
    if tokenizer is None:
        raise KninferError(f"'{model}' has no tokenizer saved with it")
    _fits_context(dense, "--max-length", max_length)
    tokenizer = with_pad_token(tokenizer)
    torch.manual_seed(seed)  # the new classification head
    classifier = as_classifier(dense, glue_task, tokenizer.pad_token_id, max_length)
    teacher_model = _task_classifier(teacher, glue_task)[0] if kd != "none" else None
    train_rows = tokenize(load_glue(glue_task, "train", data_dir, max_samples), tokenizer, max_length)
    console.print(f"{glue_task.name}: {len(train_rows):,} training rows; kd={kd} alphas={weights}")
    _fit_and_save(classifier, train_rows, out, tokenizer, checkpoints, overwrite,
                  teacher=teacher_model, kd=kd, alphas=weights,
                  temperature=temperature, collator=DataCollatorWithPadding(tokenizer), resume=resume, **options)
    metrics = evaluate(classifier, glue_task, tokenizer, data_dir, max_length)
    _report_glue(glue_task.name, model, metrics, _metrics_path(out))


def _task_classifier(source: str, task) -> tuple[Any, Any]:
    """A saved classifier for `task` and its tokenizer, else a KninferError saying how to make one."""
    from kninfer.modeling.io import load

    model, tokenizer = load(source)
    architectures = model.config.architectures or []
    if not _is_classifier(model) or model.config.num_labels != task.num_labels:
        raise KninferError(f"'{source}' is not a {task.name} classifier ({', '.join(architectures) or 'unknown'}): "
                           f"fine-tune it first with `kninfer finetune --model ... --task {task.name}`")
    return model, tokenizer


def _metrics_path(out: Path) -> Path:
    return out.with_suffix(".metrics.json") if out.suffix == ".pt" else out / "metrics.json"


def _report_glue(task: str, model: str, metrics: dict[str, dict[str, float]], out: Path | None) -> None:
    for split, values in metrics.items():
        console.print(f"{task} {split}: " + ", ".join(f"{name} {value:.4f}" for name, value in values.items()))
    if out is not None:
        _write_json({"task": task, "model": str(model), "metrics": metrics}, out)
        console.print(f"wrote {out}")


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
    import torch

    from kninfer.modeling.io import load
    from kninfer.train.data import load_lm_text
    from kninfer.train.eval_lm import perplexity

    if out is not None:
        check_output_file(out)
    lm, tokenizer = load(model)
    if _is_classifier(lm):
        raise KninferError(f"'{model}' is a sequence classifier, not a causal LM: eval-lm scores language models "
                           "(score a classifier with eval-glue)")
    if tokenizer is None:
        raise KninferError(f"'{model}' has no tokenizer saved with it")
    block_size = lm.config.n_positions if block_size is None else block_size
    stride = max(1, block_size // 2) if stride is None else stride
    if not (2 <= block_size <= lm.config.n_positions and 0 < stride <= block_size):
        raise KninferError(f"--block-size {block_size}, --stride {stride}: expected 2 <= block size <= the context "
                           f"({lm.config.n_positions}) and 1 <= stride <= block size")
    rows = load_lm_text(data, split)
    ids = torch.tensor(tokenizer("\n\n".join(rows["text"]), verbose=False)["input_ids"])
    if ids.numel() < 2:
        raise KninferError(f"'{data}' ({split}) holds fewer than two tokens")
    if torch.cuda.is_available():
        lm = lm.cuda()
    value, tokens = perplexity(lm, ids, block_size, stride)
    console.print(f"perplexity {value:.4f} over {tokens:,} tokens (window {block_size}, stride {stride})")
    if out is not None:
        _write_json({"model": model, "data": data, "split": split, "perplexity": value, "tokens": tokens,
                     "block_size": block_size, "stride": stride}, out)


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

    glue_task = get_task(task)
    if out is not None:
        check_output_file(out)
    from kninfer.train.glue import evaluate, with_pad_token

    classifier, tokenizer = _task_classifier(model, glue_task)
    if tokenizer is None:
        raise KninferError(f"'{model}' has no tokenizer saved with it")
    max_length = max_length or getattr(classifier.config, "max_input_length", None) or 128
    _fits_context(classifier, "--max-length", max_length)
    metrics = evaluate(classifier, glue_task, with_pad_token(tokenizer), data_dir, max_length, batch_size)
    _report_glue(glue_task.name, model, metrics, out)


COMMANDS = [distill, finetune, eval_lm, eval_glue]
