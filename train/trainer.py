"""DistillTrainer: transformers' Trainer with the loss replaced by weighted distillation terms from a frozen teacher.

Checkpoints, resume, gradient accumulation, mixed precision, logging and DDP/FSDP/DeepSpeed (torchrun or
`accelerate launch`) all come from Trainer; this module only supplies `compute_loss`, per-term logging, a
Ctrl-C (or SIGTERM) that stops at the end of the current step with a resumable checkpoint (`fit` then raises
TrainingInterrupted), and the choice of the checkpoint to resume.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainingArguments, default_data_collator

from kninfer.errors import KninferError
from kninfer.kron import KroneckerEmbedding, KroneckerLinear
from kninfer.modeling.families import dims
from kninfer.train.losses import TERMS, Recipe, kd_terms, loss_terms

INTERRUPTS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C; what `kill`, `docker stop` and job schedulers send
CHECKPOINT_FILES = {  # what a finished save holds besides trainer_state.json (plain, DDP, FSDP or DeepSpeed)
    "weights": ("model*.safetensors", "pytorch_model*"),
    "optimizer state": ("optimizer*", "global_step*"),
}


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped training after `step`, with a checkpoint to resume in `checkpoints` (None: none)."""

    def __init__(self, step: int, checkpoints: Path | None) -> None:
        super().__init__(step, checkpoints)
        self.step, self.checkpoints = step, checkpoints


class StopOnInterrupt(TrainerCallback):
    """First Ctrl-C or SIGTERM: finish the step, save a checkpoint and stop; a second one acts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signum, self._previous[signum])

    def on_train_begin(self, args, state, control, **kwargs):
        self.requested = False
        self._previous = {signum: signal.signal(signum, self._handle) for signum in INTERRUPTS}

    def on_step_end(self, args, state, control, **kwargs):
        requested = torch.tensor(float(self.requested), device=args.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(requested, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        if requested.item():
            self.requested = True
            control.should_save = control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def checkpoints_beside(out: str | Path) -> Path:
    """`OUT.checkpoints`: where training for the output `out` keeps its resumable checkpoints by default."""
    out = Path(out)
    return out.with_name(out.name + ".checkpoints")


def last_checkpoint(folder: str | Path) -> str | None:
    """The newest complete `checkpoint-N` in `folder`; one a kill cut short is skipped, with a note on stderr."""
    numbered = [p for p in Path(folder).glob("checkpoint-*") if p.name.removeprefix("checkpoint-").isdigit()]
    for path in sorted(numbered, key=lambda p: int(p.name.removeprefix("checkpoint-")), reverse=True):
        missing = _missing_parts(path)
        if not missing:
            return str(path)
        print(f"note: skipping incomplete '{path}' (no {', '.join(missing)})", file=sys.stderr)
    return None


def _missing_parts(checkpoint: Path) -> list[str]:
    """What a finished save would have left in `checkpoint` but is not there (Trainer writes the state last)."""
    missing = [part for part, patterns in CHECKPOINT_FILES.items()
               if not any(any(checkpoint.glob(pattern)) for pattern in patterns)]
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        missing.append("readable trainer_state.json")
    return missing


def use_eager_attention(model: PreTrainedModel) -> None:
    """Eager attention returns the attention maps ILKD needs; without attention dropout they stay distributions."""
    model.set_attn_implementation("eager")
    for module in model.modules():
        if hasattr(module, "attn_dropout"):  # GPT-2: an nn.Dropout
            module.attn_dropout.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):  # Llama: a probability
            module.attention_dropout = 0.0


class DistillTrainer(Trainer):
    """A Trainer whose loss is Σ weights[name]·term over the KD mode's terms (ILKD, vanilla KD, or plain CE), as
    `recipe` says (default: every term weighted 1, ILKD's hidden term relative).

    A loss of several terms also logs each one (`loss_<term>`); a single term logs only `loss`, as Trainer does.
    With `factor_lr`, the Kronecker factors train at that peak learning rate and the rest at the arguments' one.
    """

    def __init__(self, *args: Any, teacher: PreTrainedModel | None = None, kd: str = "none",
                 recipe: Recipe | None = None, temperature: float = 2.0, factor_lr: float | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.factor_lr = factor_lr
        terms = kd_terms(kd)
        if kd != "none" and teacher is None:
            raise KninferError(f"--kd {kd} needs a teacher")
        self.kd, self.temperature = kd, temperature
        self.recipe = recipe or Recipe({name: 1.0 for name in terms})
        # attention maps need eager attention and a (layers, heads, seq, seq) tensor per model: only when weighed
        self.attention_maps = kd == "ilkd" and self.recipe.weights["attention"] != 0
        self.model_accepts_loss_kwargs = False  # terms are means: Trainer divides by the accumulation steps
        self.teacher = None if kd == "none" else teacher.eval().requires_grad_(False).to(self.args.device)
        if kd == "ilkd":
            _check_pairable(self.model, teacher)
        if self.attention_maps:
            use_eager_attention(self.model)
            use_eager_attention(self.teacher)
        self.interrupt = StopOnInterrupt()
        self.add_callback(self.interrupt)
        self._term_sums: dict[str, torch.Tensor] = {}
        self._term_steps = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ilkd, maps = self.kd == "ilkd", self.attention_maps
        outputs = model(**inputs, output_hidden_states=ilkd, output_attentions=maps)
        teacher_outputs = None
        if self.teacher is not None:
            features = {k: v for k, v in inputs.items() if k != "labels"}
            with torch.no_grad(), self.accelerator.autocast():
                teacher_outputs = self.teacher(**features, output_hidden_states=ilkd, output_attentions=maps)
        mask = inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(inputs["input_ids"])
        terms = loss_terms(self.kd, outputs, teacher_outputs, mask, self.temperature, self.recipe.hidden)
        loss = sum(self.recipe.weights[name] * terms[name] for name in TERMS[self.kd] if name in terms)
        if model.training and len(terms) > 1:
            for name, value in terms.items():
                self._term_sums[name] = self._term_sums.get(name, 0.0) + value.detach().float()
            self._term_steps += 1
        return (loss, outputs) if return_outputs else loss

    def create_optimizer(self):
        """Trainer's optimizer; with `factor_lr`, each of its groups split in two: the factors at `factor_lr`."""
        optimizer = super().create_optimizer()
        if self.factor_lr is None:
            return optimizer
        factors = {id(p) for p in factor_parameters(self.model)}
        groups, optimizer.param_groups = optimizer.param_groups, []
        for group in groups:
            for factor in (False, True):
                params = [p for p in group["params"] if (id(p) in factors) == factor]
                if params:
                    optimizer.add_param_group(group | {"params": params} | ({"lr": self.factor_lr} if factor else {}))
        return optimizer

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add each loss term, averaged over the steps since the last log and over the processes."""
        if "loss" in logs and self._term_steps:
            names = sorted(self._term_sums)
            means = torch.stack([self._term_sums[n] for n in names]) / self._term_steps
            if self.accelerator.num_processes > 1:
                means = self.accelerator.reduce(means, reduction="mean")
            logs |= {f"loss_{n}": round(v, 6) for n, v in zip(names, means.tolist(), strict=True)}
            self._term_sums, self._term_steps = {}, 0
        super().log(logs, *args, **kwargs)


def factor_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The Kronecker factors of `model`'s factored layers (their biases are not factors)."""
    return [param for module in model.modules() if isinstance(module, KroneckerLinear | KroneckerEmbedding)
            for name, param in module.named_parameters(recurse=False) if name != "bias"]


def _check_pairable(student: PreTrainedModel, teacher: PreTrainedModel) -> None:
    """ILKD pairs layer l of the student with layer l of the teacher: same layers, width, query and KV heads."""
    s, t = dims(student.config), dims(teacher.config)
    if (s.layers, s.hidden, s.heads, s.kv_heads) != (t.layers, t.hidden, t.heads, t.kv_heads):
        raise KninferError(
            f"ILKD needs the student's layers, width and heads to match the teacher's: student "
            f"{s.layers}×{s.hidden} ({s.heads} heads, {s.kv_heads} KV), teacher {t.layers}×{t.hidden} "
            f"({t.heads} heads, {t.kv_heads} KV); train a layer-dropped student with --kd vanilla or --kd none"
        )


def fit(model: PreTrainedModel, dataset: Any, checkpoints: Path, *, teacher: PreTrainedModel | None = None,
        kd: str = "none", recipe: Recipe | None = None, temperature: float = 2.0, factor_lr: float | None = None,
        collator: Any = None, eval_dataset: Any = None, resume: bool | Literal["auto"] = False,
        callbacks: list[TrainerCallback] | None = None, tokenizer: Any = None, **options: Any) -> DistillTrainer:
    """Train `model` in place on `dataset`, checkpointing under `checkpoints`; `options` go to TrainingArguments.

    With `tokenizer`, each checkpoint-N folder holds it too: a checkpoint loads, fine-tunes and exports as a model.
    `factor_lr`: the Kronecker factors' peak learning rate (default: the `learning_rate` option, as the rest).

    With `resume`, training continues from the last complete `checkpoint-N` there (same optimizer, scheduler,
    RNG and data position): True requires one, "auto" uses one if there is. `eval_dataset` is scored by the
    `eval_strategy` option. Ctrl-C or SIGTERM stops at the end of the step with a checkpoint and raises
    TrainingInterrupted.
    """
    gpu = torch.cuda.is_available()  # on CPU, use_cpu is what makes torchrun's ranks a gloo process group
    defaults: dict[str, Any] = {"report_to": [], "save_total_limit": 2, "logging_steps": 10, "save_steps": 500,
                                "use_cpu": not gpu, "dataloader_pin_memory": gpu}
    args = TrainingArguments(output_dir=str(checkpoints), **(defaults | options))
    trainer = DistillTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=eval_dataset,
                             data_collator=collator or default_data_collator, callbacks=callbacks,
                             processing_class=tokenizer, teacher=teacher, kd=kd, recipe=recipe, temperature=temperature,
                             factor_lr=factor_lr)
    checkpoint = last_checkpoint(checkpoints) if resume else None
    if resume is True and checkpoint is None:
        raise KninferError(f"--resume: no complete checkpoint-N folder in '{checkpoints}'")
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    except ValueError as error:
        if "number of parameter groups" not in str(error):
            raise
        raise KninferError(f"'{checkpoint}' was trained with{'out' if factor_lr else ''} a separate factor LR: "
                           "resume it with the same --factor-lr setting") from None
    if trainer.interrupt.requested:
        raise TrainingInterrupted(trainer.state.global_step, Path(checkpoints))
    return trainer
