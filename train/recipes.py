"""The training recipes as functions: distill, finetune, evaluate_glue, lm_perplexity (`kninfer` commands wrap them).

Models are given as objects or as where to load them from (a directory, a .pt file or a hub name); a model given
as an object is trained in place. Each recipe reports its progress through `log` (print by default).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from datasets import Dataset
from transformers import DataCollatorWithPadding, PreTrainedModel, PreTrainedTokenizerBase

from kninfer.atomic import write_text
from kninfer.errors import KninferError
from kninfer.kron import check_positive
from kninfer.modeling.io import check_output, is_classifier, load, save
from kninfer.runtime.tasks import GlueTask, get_task
from kninfer.train.data import lm_blocks, load_lm_text
from kninfer.train.eval_lm import eval_text, perplexity
from kninfer.train.glue import as_classifier, evaluate, load_glue, tokenize, with_pad_token
from kninfer.train.losses import Recipe, loss_recipe
from kninfer.train.trainer import TrainingInterrupted, checkpoints_beside, fit

ModelSource = PreTrainedModel | str | Path
Alphas = Recipe | Mapping[str, float] | Sequence[float] | str | None  # see losses.loss_recipe
Log = Callable[[str], object]
Metrics = dict[str, dict[str, float]]  # split -> metric -> value
PRECISIONS = {"fp32": {}, "bf16": {"bf16": True}, "fp16": {"fp16": True}}


@dataclass(frozen=True)
class LMPerplexity:
    """A causal LM's sliding-window perplexity, the tokens it scored, and the window and stride used."""

    perplexity: float
    tokens: int
    block_size: int
    stride: int


def distill(
    student: ModelSource, data: str | Dataset, *, teacher: ModelSource | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None, kd: str = "ilkd", alphas: Alphas = None,
    temperature: float = 2.0, block_size: int = 256, batch_size: int = 8, lr: float = 1e-4,
    factor_lr: float | None = None, epochs: float = 1.0, max_steps: int = -1, max_samples: int | None = None,
    fraction: float | None = None, grad_accum: int = 1, logging_steps: int = 10, save_steps: int = 500,
    out: str | Path | None = None, checkpoints: str | Path | None = None, resume: bool | Literal["auto"] = False,
    overwrite: bool = False, seed: int = 0, precision: str = "fp32", log: Log = print, **trainer_options: Any,
) -> PreTrainedModel:
    """Pre-train a compressed student by distilling a teacher (ILKD by default, as the paper) and return it.

    `data`: text (a .txt/.raw file, a folder of them, or hub `dataset:config`) cut into blocks of `block_size`
    tokens, at most `max_samples` blocks from the first `fraction` of its rows; or a Dataset of blocks
    (input_ids, attention_mask, labels), used as given. `tokenizer` (default: the student's, else the
    teacher's) tokenises text and is saved with the student to `out`. `factor_lr`: the Kronecker factors' peak
    learning rate (default `lr`, as every other weight). Checkpoints go to `checkpoints` (default
    OUT.checkpoints; without `out`, a temporary folder); `resume` continues from the last complete one there
    (True: there must be one; "auto": if there is). Extra `trainer_options` go to TrainingArguments
    (lr_scheduler_type, warmup_ratio, save_strategy, ...) or to `fit` (callbacks). Ctrl-C or SIGTERM stops at a
    checkpoint and raises TrainingInterrupted.
    """
    recipe = _kd_recipe(kd, alphas, teacher, finetune=False)
    check_positive(block_size=block_size)
    _check_above_zero(factor_lr=factor_lr)
    options = _training_options(batch_size, lr, epochs, max_steps, grad_accum, logging_steps, save_steps, seed,
                                precision, temperature, **trainer_options)
    if out is not None:
        check_output(out, overwrite)  # a refused output fails now, not after the training
    model, own_tokenizer = _load(student)
    teacher_model, teacher_tokenizer = _load(teacher) if teacher is not None else (None, None)
    tokenizer = tokenizer or own_tokenizer or teacher_tokenizer
    if isinstance(data, Dataset):
        blocks = data
    else:
        if tokenizer is None:
            raise KninferError("neither the student nor the teacher has a tokenizer saved with it")
        _fits_context(model, "--block-size", block_size)
        blocks = lm_blocks(load_lm_text(data, "train"), tokenizer, block_size, max_samples, fraction)
    log(f"{len(blocks):,} blocks of {len(blocks[0]['input_ids'])} tokens; kd={kd} {_describe(kd, recipe)}")
    return _train(model, blocks, out, tokenizer, checkpoints, overwrite, log,
                  teacher=teacher_model if kd != "none" else None, kd=kd, recipe=recipe, temperature=temperature,
                  factor_lr=factor_lr, resume=resume, **options)


def finetune(
    model: ModelSource, task: str, *, data_dir: str | Path | None = None, teacher: ModelSource | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None, kd: str | None = None, alphas: Alphas = None,
    temperature: float = 2.0, max_length: int = 128, batch_size: int = 32, lr: float = 5e-5, epochs: float = 3.0,
    max_steps: int = -1, max_samples: int | None = None, grad_accum: int = 1, logging_steps: int = 10,
    save_steps: int = 500, out: str | Path | None = None, checkpoints: str | Path | None = None,
    resume: bool | Literal["auto"] = False, overwrite: bool = False, seed: int = 0, precision: str = "fp32",
    log: Log = print, **trainer_options: Any,
) -> tuple[PreTrainedModel, Metrics]:
    """Fine-tune a causal LM (or a classifier) on a GLUE task and score the dev split(s): (classifier, metrics).

    Plain CE, or KD (`kd`, default ilkd with a `teacher`) from a classifier fine-tuned on the task. Rows come
    from `data_dir` in the GLUE layout (SST-2/train.tsv, ...), else the hub. With `out`, the classifier is saved
    there and its metrics beside it (OUT/metrics.json, or OUT.metrics.json for a .pt). Checkpoints, resume,
    `trainer_options` and interrupts as in `distill`.
    """
    glue_task = get_task(task)
    kd = kd or ("ilkd" if teacher is not None else "none")
    recipe = _kd_recipe(kd, alphas, teacher, finetune=True,
                        teacher_hint=f" (a classifier fine-tuned on {glue_task.name})")
    check_positive(max_length=max_length)
    options = _training_options(batch_size, lr, epochs, max_steps, grad_accum, logging_steps, save_steps, seed,
                                precision, temperature, **trainer_options)
    if out is not None:
        check_output(out, overwrite)
    dense, own_tokenizer = _load(model)
    tokenizer = tokenizer or own_tokenizer
    if tokenizer is None:
        raise KninferError(f"'{_name(model)}' has no tokenizer saved with it")
    _fits_context(dense, "--max-length", max_length)
    tokenizer = with_pad_token(tokenizer)
    torch.manual_seed(seed)  # the new classification head
    classifier = as_classifier(dense, glue_task, tokenizer.pad_token_id, max_length)
    teacher_model = _task_classifier(teacher, glue_task)[0] if kd != "none" else None
    train_rows = tokenize(load_glue(glue_task, "train", data_dir, max_samples), tokenizer, max_length)
    log(f"{glue_task.name}: {len(train_rows):,} training rows; kd={kd} {_describe(kd, recipe)}")
    classifier = _train(classifier, train_rows, out, tokenizer, checkpoints, overwrite, log,
                        teacher=teacher_model, kd=kd, recipe=recipe, temperature=temperature,
                        collator=DataCollatorWithPadding(tokenizer), resume=resume, **options)
    metrics = evaluate(classifier, glue_task, tokenizer, data_dir, max_length)
    _report_glue(glue_task, model, metrics, None if out is None else _metrics_path(Path(out)), log)
    return classifier, metrics


def evaluate_glue(
    model: ModelSource, task: str, *, data_dir: str | Path | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None, max_length: int | None = None, batch_size: int = 32,
    out: str | Path | None = None, log: Log = print,
) -> Metrics:
    """A fine-tuned classifier's metrics on a GLUE task's dev split(s) (MNLI: matched and mismatched).

    Inputs are cut to `max_length` tokens (default: the length the classifier was fine-tuned on, else 128);
    with `out`, the metrics are also written there as JSON.
    """
    glue_task = get_task(task)
    check_positive(batch_size=batch_size)
    classifier, own_tokenizer = _task_classifier(model, glue_task)
    tokenizer = tokenizer or own_tokenizer
    if tokenizer is None:
        raise KninferError(f"'{_name(model)}' has no tokenizer saved with it")
    max_length = max_length or getattr(classifier.config, "max_input_length", None) or 128
    _fits_context(classifier, "--max-length", max_length)
    metrics = evaluate(classifier, glue_task, with_pad_token(tokenizer), data_dir, max_length, batch_size)
    _report_glue(glue_task, model, metrics, out, log)
    return metrics


def lm_perplexity(
    model: ModelSource, data: str | Path, *, split: str = "test", tokenizer: PreTrainedTokenizerBase | None = None,
    block_size: int | None = None, stride: int | None = None, out: str | Path | None = None, log: Log = print,
) -> LMPerplexity:
    """Sliding-window perplexity of a causal LM on a text (a file, a folder's `split` files, or hub `dataset:config`).

    The text's rows are joined by blank lines, as the Hugging Face recipe and `kninfer eval` join them; windows
    of `block_size` tokens (default: the context) every `stride` tokens (default: half the window). A model
    loaded here runs on the GPU when there is one; with `out`, the result is also written there as JSON.
    """
    lm, own_tokenizer = _load(model)
    if is_classifier(lm):
        raise KninferError(f"'{_name(model)}' is a sequence classifier, not a causal LM: eval-lm scores language "
                           "models (score a classifier with eval-glue)")
    tokenizer = tokenizer or own_tokenizer
    if tokenizer is None:
        raise KninferError(f"'{_name(model)}' has no tokenizer saved with it")
    context = lm.config.max_position_embeddings
    block_size = context if block_size is None else block_size
    stride = max(1, block_size // 2) if stride is None else stride
    if not (2 <= block_size <= context and 0 < stride <= block_size):
        raise KninferError(f"--block-size {block_size}, --stride {stride}: expected 2 <= block size <= the context "
                           f"({context}) and 1 <= stride <= block size")
    ids = torch.tensor(tokenizer(eval_text(str(data), split), verbose=False)["input_ids"])
    if ids.numel() < 2:
        raise KninferError(f"'{data}' ({split}) holds fewer than two tokens")
    if torch.cuda.is_available() and not isinstance(model, PreTrainedModel):
        lm = lm.cuda()
    result = LMPerplexity(*perplexity(lm, ids, block_size, stride), block_size, stride)
    log(f"perplexity {result.perplexity:.4f} over {result.tokens:,} tokens (window {block_size}, stride {stride})")
    if out is not None:
        _write_json({"model": _name(model), "data": str(data), "split": split, **asdict(result)}, out)
    return result


def _load(source: ModelSource) -> tuple[PreTrainedModel, Any]:
    """The model and its saved tokenizer; a model given as an object comes without one."""
    return (source, None) if isinstance(source, PreTrainedModel) else load(source)


def _name(source: ModelSource) -> str:
    """How reports and errors name a model: where it came from, or its class."""
    return type(source).__name__ if isinstance(source, PreTrainedModel) else str(source)


def _kd_recipe(kd: str, alphas: Alphas, teacher: ModelSource | None, finetune: bool,
               teacher_hint: str = "") -> Recipe:
    """The KD mode's loss recipe, checked; any mode but "none" needs a teacher."""
    recipe = loss_recipe(kd, alphas, finetune=finetune)
    if kd != "none" and teacher is None:
        raise KninferError(f"--kd {kd} needs --teacher{teacher_hint}")
    return recipe


def _describe(kd: str, recipe: Recipe) -> str:
    """How a log line names a recipe: its weights, and ILKD's hidden form."""
    return f"alphas={recipe.weights}" + (f" hidden={recipe.hidden}" if kd == "ilkd" else "")


def _training_options(batch_size: int, lr: float, epochs: float, max_steps: int, grad_accum: int, logging_steps: int,
                      save_steps: int, seed: int, precision: str, temperature: float,
                      **trainer_options: Any) -> dict[str, Any]:
    """The recipes' common settings, checked, as `fit` options (TrainingArguments fields)."""
    check_positive(batch_size=batch_size, grad_accum=grad_accum, logging_steps=logging_steps, save_steps=save_steps)
    _check_above_zero(lr=lr, epochs=epochs, temperature=temperature)
    if precision not in PRECISIONS:
        raise KninferError(f"unknown --precision '{precision}': expected one of {', '.join(PRECISIONS)}")
    return {"seed": seed, **PRECISIONS[precision], "per_device_train_batch_size": batch_size, "learning_rate": lr,
            "num_train_epochs": epochs, "max_steps": max_steps, "gradient_accumulation_steps": grad_accum,
            "logging_steps": logging_steps, "save_steps": save_steps, **trainer_options}


def _check_above_zero(**values: float | None) -> None:
    """Refuse a value of 0 or less (a learning rate, a temperature, a number of epochs); None is not given."""
    for name, value in values.items():
        if value is not None and not value > 0:
            raise KninferError(f"{name} must be above 0, got {value!r}")


def _fits_context(model: PreTrainedModel, option: str, length: int) -> None:
    """Refuse a sequence length beyond the model's context (its position embeddings end there)."""
    if length > model.config.max_position_embeddings:
        raise KninferError(f"{option} {length} exceeds the model's context of {model.config.max_position_embeddings}")


def _train(model: PreTrainedModel, dataset: Dataset, out: str | Path | None, tokenizer: Any,
           checkpoints: str | Path | None, overwrite: bool, log: Log, **fit_options: Any) -> PreTrainedModel:
    """Train with `fit`, then save the model (with its tokenizer) to `out` when given."""
    with _checkpoint_folder(out, checkpoints) as folder:
        trained = fit(model, dataset, folder, tokenizer=tokenizer, **fit_options).model
    if out is not None:
        save(trained, out, tokenizer, overwrite=overwrite)
        log(f"wrote {out}")
    return trained


@contextmanager
def _checkpoint_folder(out: str | Path | None, checkpoints: str | Path | None) -> Iterator[Path]:
    """`checkpoints`, else OUT.checkpoints, else a temporary folder (removed afterwards: an interrupt keeps none)."""
    if checkpoints is not None or out is not None:
        yield Path(checkpoints) if checkpoints is not None else checkpoints_beside(out)
        return
    with tempfile.TemporaryDirectory(prefix="kninfer-checkpoints-") as scratch:
        try:
            yield Path(scratch)
        except TrainingInterrupted as stop:
            raise TrainingInterrupted(stop.step, None) from None


def _task_classifier(source: ModelSource, task: GlueTask) -> tuple[PreTrainedModel, Any]:
    """A saved classifier for `task` and its tokenizer, else a KninferError saying how to make one."""
    model, tokenizer = _load(source)
    architectures = ", ".join(model.config.architectures or []) or "unknown"
    if not is_classifier(model) or model.config.num_labels != task.num_labels:
        raise KninferError(f"'{_name(source)}' is not a {task.name} classifier ({architectures}): fine-tune it "
                           f"first with `kninfer finetune --model ... --task {task.name}`")
    return model, tokenizer


def _metrics_path(out: Path) -> Path:
    return out.with_suffix(".metrics.json") if out.suffix == ".pt" else out / "metrics.json"


def _report_glue(task: GlueTask, model: ModelSource, metrics: Metrics, out: str | Path | None, log: Log) -> None:
    """Log each split's metrics; write them to `out` as JSON when given."""
    for split, values in metrics.items():
        log(f"{task.name} {split}: " + ", ".join(f"{name} {value:.4f}" for name, value in values.items()))
    if out is not None:
        _write_json({"task": task.name, "model": _name(model), "metrics": metrics}, out)
        log(f"wrote {out}")


def _write_json(payload: dict[str, Any], out: str | Path) -> None:
    write_text(out, json.dumps(payload, indent=1) + "\n")
