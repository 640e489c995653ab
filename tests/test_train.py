"""Training: ILKD on a tiny teacher, resume after Ctrl-C, sliding-window perplexity, GLUE fine-tuning from the CLI."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback, default_data_collator

from kninfer.errors import KninferError
from kninfer.modeling.compress import compress
from kninfer.train.eval_lm import perplexity
from kninfer.train.losses import loss_recipe
from kninfer.train.trainer import TrainingInterrupted, fit

BLOCK = 32
FAST = {"per_device_train_batch_size": 4, "learning_rate": 3e-3, "logging_steps": 1, "seed": 0,
        "disable_tqdm": True, "save_strategy": "no"}


def _blocks(n: int, seed: int = 0) -> Dataset:
    """Random-token LM blocks over a 500-token slice of the vocabulary (learnable in a few steps)."""
    ids = np.random.default_rng(seed).integers(0, 500, (n, BLOCK)).tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * BLOCK] * n, "labels": ids})


@pytest.fixture(scope="module")
def trained_teacher(tiny_teacher, tmp_path_factory):
    """The tiny random teacher after a few steps of plain LM training (kd=none)."""
    teacher = copy.deepcopy(tiny_teacher)
    fit(teacher, _blocks(32), tmp_path_factory.mktemp("teacher-ckpt"), kd="none", collator=default_data_collator,
        max_steps=8, **FAST)
    return teacher.eval()


def _losses(trainer, key: str = "loss") -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def test_ilkd_loss_falls(trained_teacher, tmp_path):
    student, _ = compress(trained_teacher, "kngpt2")
    trainer = fit(student, _blocks(120, seed=1), tmp_path, teacher=trained_teacher, kd="ilkd",
                  recipe=loss_recipe("ilkd", "paper", finetune=False),
                  collator=default_data_collator, max_steps=30, **FAST)
    losses = np.array(_losses(trainer))
    assert len(losses) == 30
    assert losses[-5:].mean() < 0.9 * losses[:5].mean(), losses
    terms = {t: np.array(_losses(trainer, f"loss_{t}")) for t in ("embedding", "attention", "hidden", "ce")}
    # every term is logged on its own, and they add up to the logged loss
    np.testing.assert_allclose(0.5 * (terms["embedding"] + terms["attention"] + terms["hidden"]) + 0.1 * terms["ce"],
                               losses, atol=2e-4)
    distillation = 0.5 * (terms["embedding"] + terms["attention"] + terms["hidden"])
    assert distillation[-5:].mean() < 0.6 * distillation[:5].mean(), distillation


def test_default_ilkd_recipe_needs_no_attention_maps(trained_teacher, tmp_path):
    """kninfer's recipe weighs no attention term: the student keeps its fast attention and logs no attention term;
    the logged loss is hidden (relative) + CE, and it falls."""
    student, _ = compress(trained_teacher, "kngpt2")
    trainer = fit(student, _blocks(120, seed=1), tmp_path, teacher=trained_teacher, kd="ilkd",
                  recipe=loss_recipe("ilkd", None, finetune=False), collator=default_data_collator, max_steps=20,
                  **FAST)
    assert not trainer.attention_maps and student.config._attn_implementation != "eager"
    losses = np.array(_losses(trainer))
    terms = {t: np.array(_losses(trainer, f"loss_{t}")) for t in ("embedding", "hidden", "ce")}
    assert not _losses(trainer, "loss_attention")
    np.testing.assert_allclose(terms["hidden"] + terms["ce"], losses, atol=2e-4)
    assert losses[-5:].mean() < 0.9 * losses[:5].mean(), losses


def test_ilkd_refuses_a_layer_dropped_student(trained_teacher, tmp_path):
    student, _ = compress(trained_teacher, "distil")
    with pytest.raises(KninferError, match="--kd vanilla"):
        fit(student, _blocks(4), tmp_path, teacher=trained_teacher, kd="ilkd", collator=default_data_collator,
            max_steps=1, **FAST)
    trainer = fit(student, _blocks(8), tmp_path, teacher=trained_teacher, kd="vanilla",
                  collator=default_data_collator, max_steps=2, **FAST)
    assert len(_losses(trainer, "loss_kd")) == 2


class _CtrlCAt(TrainerCallback):
    """Sends this process a real SIGINT during step `step`."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.filterwarnings("ignore:mtime may not be reliable")  # tiny steps save checkpoints within 1 s
def test_ctrl_c_then_resume_equals_uninterrupted(trained_teacher, tmp_path):
    """Ctrl-C at step 3 raises, leaving checkpoint-3; resuming it ends with the uninterrupted run's weights."""
    options = dict(FAST, save_strategy="steps", save_steps=100, max_steps=6)
    base, _ = compress(trained_teacher, "kngpt2")
    kwargs = {"teacher": trained_teacher, "kd": "ilkd", "collator": default_data_collator}

    straight = copy.deepcopy(base)
    fit(straight, _blocks(40), tmp_path / "a", **kwargs, **options)

    stopped = copy.deepcopy(base)
    with pytest.raises(TrainingInterrupted) as stop:
        fit(stopped, _blocks(40), tmp_path / "b", callbacks=[_CtrlCAt(3)], **kwargs, **options)
    assert (stop.value.step, stop.value.checkpoints) == (3, tmp_path / "b")
    assert (tmp_path / "b" / "checkpoint-3").is_dir()

    resumed = copy.deepcopy(base)
    second = fit(resumed, _blocks(40), tmp_path / "b", resume=True, **kwargs, **options)
    assert second.state.global_step == 6
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)
    assert not torch.equal(straight.transformer.h[1].mlp.c_fc.A, base.transformer.h[1].mlp.c_fc.A)


def test_factor_lr_trains_as_adamw_with_the_factors_in_their_own_group(kngpt2, tmp_path):
    """fit(factor_lr=F) ends where torch's AdamW does with the factors (A, B, A_t) at F and every other weight at
    the base LR: 3 steps of CE on one batch, constant LR, no clipping, no dropout (one LR for all would differ)."""
    lr, factor_lr = FAST["learning_rate"], 10 * FAST["learning_rate"]
    student = copy.deepcopy(kngpt2).train()
    for module in student.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    reference = copy.deepcopy(student)
    batch = _blocks(4, seed=2)
    fit(student, batch, tmp_path, kd="none", collator=default_data_collator, factor_lr=factor_lr, max_steps=3,
        lr_scheduler_type="constant", max_grad_norm=0.0, **FAST)

    named = dict(reference.named_parameters())
    factors = [p for name, p in named.items() if name.rsplit(".", 1)[-1] in ("A", "B", "A_t")]
    rest = [p for name, p in named.items() if name.rsplit(".", 1)[-1] not in ("A", "B", "A_t")]
    assert factors and rest
    optimizer = torch.optim.AdamW([{"params": rest, "lr": lr}, {"params": factors, "lr": factor_lr}], weight_decay=0.0)
    inputs = default_data_collator(list(batch))
    for _ in range(3):
        reference(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for (name, expected), trained in zip(reference.state_dict().items(), student.state_dict().values(), strict=True):
        torch.testing.assert_close(trained, expected, rtol=0, atol=2e-5, msg=name)


def test_resume_without_the_factor_lr_of_the_checkpoint_is_one_line(kngpt2, tmp_path):
    """A checkpoint written with factor_lr resumed without it (its optimizer has other groups): a KninferError."""
    options = dict(FAST, save_strategy="steps", save_steps=1, max_steps=1)
    fit(copy.deepcopy(kngpt2), _blocks(4), tmp_path, kd="none", factor_lr=1e-2, **options)
    with pytest.raises(KninferError, match="same --factor-lr"):
        fit(copy.deepcopy(kngpt2), _blocks(4), tmp_path, kd="none", resume=True, **dict(options, max_steps=2))


def _token_nll(model, ids: torch.Tensor) -> np.ndarray:
    """-log p(ids[t] | ids[:t]) for t >= 1, in float64, from one forward pass."""
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[None]).logits[0, :-1].double(), -1)
    return -logp[torch.arange(len(ids) - 1), ids[1:]].numpy()


def test_perplexity_equals_exp_mean_nll(trained_teacher):
    ids = torch.tensor(np.random.default_rng(2).integers(0, 500, 100))
    # a window longer than the text: every token sees its full context, whatever the stride
    ppl, count = perplexity(trained_teacher, ids, block_size=128, stride=16)
    assert count == 99
    assert ppl == pytest.approx(math.exp(_token_nll(trained_teacher, ids).mean()), rel=1e-5)
    # stride = window: independent chunks, the first token of each chunk unscored
    ppl, count = perplexity(trained_teacher, ids, block_size=25, stride=25)
    nll = np.concatenate([_token_nll(trained_teacher, ids[i : i + 25]) for i in range(0, 100, 25)])
    assert count == len(nll) == 96
    assert ppl == pytest.approx(math.exp(nll.mean()), rel=1e-5)
    # overlapping windows: token t is scored in the first window reaching it, starting at 8k, k = max(0, ⌊(t-32)/8⌋+1)
    ppl, count = perplexity(trained_teacher, ids, block_size=32, stride=8)
    starts = [max(0, (t - 32) // 8 + 1) * 8 for t in range(1, 100)]
    nll = [_token_nll(trained_teacher, ids[s : t + 1])[-1] for t, s in zip(range(1, 100), starts, strict=True)]
    assert count == 99
    assert ppl == pytest.approx(math.exp(np.mean(nll)), rel=1e-5)


def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run([sys.executable, "-m", "kninfer.cli", *args], capture_output=True, text=True, env=env)
    if check and result.returncode != 0:
        raise AssertionError(result.stderr[-3000:])
    return result


def test_finetune_cli_on_sst2_slice(tiny_teacher_dir, data_dir, tmp_path):
    """`kninfer finetune` on 200 SST-2 rows writes a classifier and dev metrics that match a padding-free recount."""
    from kninfer.modeling.io import load
    from kninfer.runtime.tasks import TASKS, input_text, read_glue_tsv

    out = tmp_path / "sst2"
    _cli("finetune", "--model", str(tiny_teacher_dir), "--task", "sst2", "--data-dir", str(data_dir / "glue"),
         "--out", str(out), "--max-samples", "200", "--batch-size", "16", "--max-steps", "4", "--lr", "1e-3",
         "--max-length", "32")
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]["dev"]
    model, tokenizer = load(out)
    assert type(model).__name__ == "GPT2ForSequenceClassification" and model.config.num_labels == 2
    assert (model.config.glue_task, model.config.max_input_length) == ("sst2", 32)  # what a bundle will carry
    texts, labels = read_glue_tsv(data_dir / "glue/SST-2/dev.tsv", TASKS["sst2"])
    with torch.no_grad():  # one row at a time: no padding, the last token is the pooled one
        preds = [model(torch.tensor([tokenizer(input_text(t))["input_ids"][:32]])).logits.argmax().item()
                 for t in texts]
    assert metrics["accuracy"] == pytest.approx(np.mean(np.array(preds) == labels), abs=1e-9)


def _main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """Run the `kninfer` entry point in this process: its exit code and stderr."""
    from kninfer.cli import main

    monkeypatch.setattr(sys, "argv", ["kninfer", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err


def test_cli_bad_input_exits_2(tiny_teacher_dir, data_dir, tmp_path, monkeypatch, capsys):
    code, err = _main(monkeypatch, capsys, "finetune", "--model", str(tiny_teacher_dir), "--task", "squad",
                      "--out", str(tmp_path / "x"))
    assert code == 2 and "unknown GLUE task 'squad'" in err and len(err.strip().splitlines()) == 1
    code, err = _main(monkeypatch, capsys, "eval-glue", str(tiny_teacher_dir), "--task", "sst2")
    assert code == 2 and "is not a sst2 classifier" in err
    code, err = _main(monkeypatch, capsys, "distill", "--student", str(tmp_path / "none.pt"), "--teacher",
                      str(tiny_teacher_dir), "--data", str(data_dir / "sotu"), "--out", str(tmp_path / "x"))
    assert code == 2 and "no such file" in err
    code, err = _main(monkeypatch, capsys, "distill", "--student", str(tiny_teacher_dir), "--data",
                      str(data_dir / "sotu"), "--out", str(tmp_path / "x"), "--kd", "none", "--factor-lr", "0")
    assert code == 2 and "--factor-lr" in err and "is not above 0" in err
    code, err = _main(monkeypatch, capsys, "eval-lm", str(tiny_teacher_dir), "--data", str(tmp_path / "nope.txt"))
    assert code == 2 and "no such file" in err
    assert not (tmp_path / "x").exists()
