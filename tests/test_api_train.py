"""The Python API (kninfer.train, kninfer.export) against the CLI, a saved copy, or a direct computation."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from kninfer.export import export
from kninfer.modeling import compress, load, save
from kninfer.runtime.bundle import read_bundle
from kninfer.runtime.tokenizer import encode, load_tokenizer
from kninfer.train import TrainingInterrupted, distill, evaluate_glue, finetune, lm_perplexity

QUIET = {"log": lambda text: None}
SHORT_RUN = {"block_size": 32, "batch_size": 2, "lr": 1e-3, "seed": 3, "logging_steps": 1, "disable_tqdm": True}


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, tiny_teacher, gpt2_tokenizer) -> Path:
    """The tiny teacher compressed with the kngpt2 preset, saved with its tokenizer."""
    student, _ = compress(tiny_teacher, "kngpt2")
    return save(student, tmp_path_factory.mktemp("student") / "kngpt2", gpt2_tokenizer)


def test_distill_equals_the_cli(student_dir, tiny_teacher_dir, text_file, tmp_path, monkeypatch):
    from kninfer.cli import main

    monkeypatch.setattr(sys, "argv", ["kninfer", "distill", "--student", str(student_dir), "--teacher",
                                      str(tiny_teacher_dir), "--data", str(text_file), "--out", str(tmp_path / "cli"),
                                      "--block-size", "32", "--batch-size", "2", "--lr", "1e-3", "--seed", "3",
                                      "--max-steps", "3", "--logging-steps", "1"])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code == 0
    trained = distill(student_dir, str(text_file), teacher=tiny_teacher_dir, max_steps=3, out=tmp_path / "api",
                      **SHORT_RUN, **QUIET)
    from_cli, saved = load(tmp_path / "cli")[0].state_dict(), load(tmp_path / "api")[0].state_dict()
    initial = load(student_dir)[0].state_dict()
    assert max((from_cli[k] - initial[k]).abs().max().item() for k in initial) > 1e-4  # it did train
    for name, value in trained.state_dict().items():
        torch.testing.assert_close(value, from_cli[name], rtol=0, atol=1e-6, msg=name)
        torch.testing.assert_close(saved[name], value, rtol=0, atol=0, msg=name)


class _InterruptAt(TrainerCallback):
    """Sends this process a real SIGINT during step `step`."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.filterwarnings("ignore:mtime may not be reliable")  # tiny steps save checkpoints within 1 s
def test_an_interrupt_raises_training_interrupted(student_dir, text_file, tmp_path):
    options = {"kd": "none", "max_steps": 3, **SHORT_RUN, **QUIET}
    with pytest.raises(TrainingInterrupted) as stop:
        distill(student_dir, str(text_file), out=tmp_path / "s", callbacks=[_InterruptAt(2)], **options)
    assert (stop.value.step, stop.value.checkpoints) == (2, tmp_path / "s.checkpoints")
    assert (tmp_path / "s.checkpoints" / "checkpoint-2").is_dir() and not (tmp_path / "s").exists()
    distill(student_dir, str(text_file), out=tmp_path / "s", resume=True, **options)
    assert (tmp_path / "s").is_dir()
    with pytest.raises(TrainingInterrupted) as stop:  # no output, no checkpoint folder: nothing is kept
        distill(student_dir, str(text_file), callbacks=[_InterruptAt(2)], **options)
    assert (stop.value.step, stop.value.checkpoints) == (2, None)


@pytest.mark.filterwarnings("ignore:mtime may not be reliable")
def test_a_checkpoint_is_a_model_folder_with_its_tokenizer(student_dir, text_file, data_dir, gpt2_tokenizer,
                                                          tmp_path):
    trained = distill(student_dir, str(text_file), kd="none", max_steps=2, save_steps=2,
                      checkpoints=tmp_path / "ckpt", **SHORT_RUN, **QUIET)
    model, tokenizer = load(tmp_path / "ckpt" / "checkpoint-2")
    text = "The state of the Union is strong."
    assert tokenizer(text)["input_ids"] == gpt2_tokenizer(text)["input_ids"]
    for name, value in trained.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0, msg=name)
    _, metrics = finetune(tmp_path / "ckpt" / "checkpoint-2", "sst2", data_dir=data_dir / "glue", max_samples=16,
                          batch_size=8, max_steps=1, max_length=32, **QUIET)  # needs the checkpoint's tokenizer
    assert 0 <= metrics["dev"]["accuracy"] <= 1


def test_finetune_metrics_equal_evaluate_glue_on_the_saved_classifier(tiny_teacher_dir, data_dir, tmp_path):
    glue = data_dir / "glue"
    classifier, metrics = finetune(tiny_teacher_dir, "sst2", data_dir=glue, max_samples=64, batch_size=16,
                                   max_steps=2, lr=1e-3, max_length=32, out=tmp_path / "clf", **QUIET)
    assert (classifier.config.glue_task, classifier.config.max_input_length) == ("sst2", 32)
    assert set(metrics["dev"]) == {"accuracy"}
    assert evaluate_glue(tmp_path / "clf", "sst2", data_dir=glue, **QUIET) == metrics
    assert json.loads((tmp_path / "clf" / "metrics.json").read_text())["metrics"] == metrics


def test_export_of_a_model_object_is_verified_and_bundles_the_tokenizer(tiny_teacher, tiny_teacher_dir,
                                                                         gpt2_tokenizer, tmp_path):
    student, _ = compress(tiny_teacher, "kngpt2", tie_head=True)
    lines: list[str] = []
    report = export(student, tmp_path / "b" / "model.onnx", tokenizer=tiny_teacher_dir, log=lines.append)
    assert report.verification is not None and report.verification.max_abs_diff <= 1e-4
    assert report.kronecker_layers > 0 and lines[0].startswith(f"wrote {report.onnx_path}")
    bundle = read_bundle(tmp_path / "b")
    text = "The state of the Union is strong."
    assert encode(load_tokenizer(bundle.tokenizer_path), text) == gpt2_tokenizer(text)["input_ids"]


def test_lm_perplexity_scores_the_lines_joined_by_blank_lines(tiny_teacher, tiny_teacher_dir, gpt2_tokenizer,
                                                              tmp_path):
    lines = ["The state of the Union is strong.\n", "We will meet the moment.\n", "Thank you.\n"]
    (tmp_path / "t.txt").write_text("".join(lines), encoding="utf-8")
    result = lm_perplexity(tiny_teacher_dir, tmp_path / "t.txt", block_size=64, **QUIET)
    ids = torch.tensor(gpt2_tokenizer("\n\n".join(lines))["input_ids"])
    assert len(ids) <= 64  # one window: every token after the first is scored with its full context
    with torch.no_grad():
        logp = torch.log_softmax(tiny_teacher(ids[None]).logits[0, :-1].double(), -1)
    nll = -logp[torch.arange(len(ids) - 1), ids[1:]].mean().item()
    assert (result.tokens, result.block_size, result.stride) == (len(ids) - 1, 64, 32)
    assert result.perplexity == pytest.approx(math.exp(nll), rel=1e-5)
