"""Every bad input from the issue gives one line on stderr and exit 2; and the behaviour bugs it found, fixed."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kninfer.runtime.bundle import read_bundle
from kninfer.runtime.generate import Sampling, generate
from kninfer.runtime.session import CausalLM
from kninfer.runtime.tokenizer import encode, load_tokenizer

DISTILL = ["distill", "--student", "s", "--data", "d.txt", "--out", "o"]
FINETUNE = ["finetune", "--model", "m", "--task", "sst2", "--out", "o"]
PRETRAIN = ["pretrain", "--data", "d.txt", "--out", "o"]
GENERATE = ["generate", "b", "--prompt", "hi"]
SENTENCES = ["a gripping , funny film .", "dull and far too long .", "the cast is fine ."]


def _main(monkeypatch, capsys, *args: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    """Run the `kninfer` entry point in this process: exit code, stdout, stderr."""
    from kninfer.cli import main

    monkeypatch.setattr(sys, "argv", ["kninfer", *args])
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def _one_line_error(result: tuple[int, str, str], expected: str) -> None:
    code, _, err = result
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (code, err)


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory, sst2_classifier, gpt2_tokenizer) -> Path:
    path = tmp_path_factory.mktemp("clf")
    sst2_classifier.save_pretrained(path)
    gpt2_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Text inputs, good and bad."""
    root = tmp_path_factory.mktemp("files")
    contents = {"empty.txt": b"", "latin1.txt": "caf\u00e9 cr\u00e8me\n".encode("latin-1"),
                "text.txt": b"The state of the Union is strong. " * 40 + b"\n",
                "unlabelled.tsv": ("index\tsentence\n" + "".join(f"{i}\t{s}\n" for i, s in enumerate(SENTENCES)))
                .encode(), "latin1.tsv": "index\tsentence\n0\tna\u00efve\n".encode("latin-1")}
    for name, data in contents.items():
        (root / name).write_bytes(data)
    return {name.replace(".", "_"): root / name for name in contents}


@pytest.mark.parametrize("args, expected", [
    (DISTILL + ["--block-size", "0"], "--block-size"),
    (DISTILL + ["--batch-size", "0"], "--batch-size"),
    (DISTILL + ["--lr", "-1"], "-1 is not above 0"),
    (DISTILL + ["--seed", "-1"], "--seed"),
    (DISTILL + ["--seed", str(2**32)], "--seed"),
    (DISTILL + ["--epochs", "0"], "--epochs"),
    (DISTILL + ["--epochs", "-2"], "--epochs"),
    (DISTILL + ["--grad-accum", "0"], "--grad-accum"),
    (DISTILL + ["--logging-steps", "0"], "--logging-steps"),
    (DISTILL + ["--save-steps", "0"], "--save-steps"),
    (DISTILL + ["--temperature", "0"], "--temperature"),
    (FINETUNE + ["--max-length", "0"], "--max-length"),
    (FINETUNE + ["--epochs", "-1"], "--epochs"),
    (PRETRAIN + ["--block-size", "1"], "--block-size"),
    (PRETRAIN + ["--lr", "0"], "--lr"),
    (["eval-glue", "m", "--task", "sst2", "--batch-size", "0"], "--batch-size"),
    (["export", "m", "o.onnx", "--opset", "5"], "--opset 5: expected 9 to"),
    (["export", "m", "o.onnx", "--opset", "99"], "--opset 99: expected 9 to"),
    (GENERATE + ["--max-new-tokens", "-1"], "--max-new-tokens is -1"),
    (GENERATE + ["--threads", "0"], "--threads"),
    (GENERATE + ["--seed", "-1"], "--seed"),
    (["classify", "b", "--text", "x", "--batch-size", "0"], "--batch-size"),
    (["eval", "b", "--text-file", "t", "--threads", "0"], "--threads"),
    (["distill", "--student", "s"], "Missing option"),
    (["generate", "b", "--prompt", "x", "--no-such-option"], "No such option"),
])
def test_bad_option_values(monkeypatch, capsys, args, expected):
    _one_line_error(_main(monkeypatch, capsys, *args), expected)


def test_bad_text_and_wrong_models(monkeypatch, capsys, gpt2_bundle, sst2_bundle, classifier_dir,
                                   tiny_teacher_dir, files):
    lm, clf, teacher = str(gpt2_bundle), str(sst2_bundle), str(tiny_teacher_dir)
    cases = [
        (["generate", lm, "--prompt", "fine", "--prompt", "\udcff"], None, "--prompt 2 is not UTF-8"),
        (["generate", lm, "--prompt", "-"], b"ok \xff", "stdin is not UTF-8 text (invalid start byte at byte 3)"),
        (["classify", clf, "--text", "caf\udce9"], None, "--text 1 is not UTF-8"),
        (["classify", clf, "--text", "a", "--pair", "\udcff"], None, "--pair 1 is not UTF-8"),
        (["classify", clf, "--file", str(files["latin1_tsv"])], None, "is not UTF-8 text"),
        (["eval-lm", teacher, "--data", str(files["empty_txt"])], None, "is empty"),
        (["eval-lm", teacher, "--data", str(files["latin1_txt"])], None, "is not UTF-8 text"),
        (["distill", "--student", teacher, "--kd", "none", "--data", str(files["latin1_txt"]), "--block-size", "16",
          "--out", "o"], None, "is not UTF-8 text"),
        (["eval-lm", str(classifier_dir), "--data", str(files["text_txt"])], None, "not a causal LM"),
        (["eval-lm", teacher, "--data", str(files["text_txt"]), "--stride", "0"], None, "--stride 0"),
        (["eval-lm", teacher, "--data", str(files["text_txt"]), "--block-size", "1"], None, "--block-size 1"),
        (["eval", clf, "--text-file", str(files["text_txt"])], None, "perplexity needs a causal-lm bundle"),
        (["eval", lm, "--text-file", str(files["text_txt"]), "--stride", "0"], None, "--stride 0"),
        (["eval", lm, "--text-file", str(files["text_txt"]), "--max-length", "1"], None, "at least 2 tokens"),
    ]
    for args, stdin, expected in cases:
        _one_line_error(_main(monkeypatch, capsys, *args, stdin=stdin), expected)


def test_unwritable_outputs(monkeypatch, capsys, sst2_bundle, tiny_teacher_dir, files, tmp_path):
    import datasets

    tsv, text = str(files["unlabelled_tsv"]), str(files["text_txt"])
    cases = [
        (["classify", str(sst2_bundle), "--file", tsv, "--out", "/proc/kninfer.tsv"], "cannot write"),
        (["classify", str(sst2_bundle), "--file", tsv, "--out", str(tmp_path)], "is a folder"),
        (["eval-lm", str(tiny_teacher_dir), "--data", text, "--out", "/proc/kninfer.json"], "cannot write"),
        (["eval-glue", str(tiny_teacher_dir), "--task", "sst2", "--out", str(tmp_path)], "is a folder"),
        # an OSError from inside a library (Trainer making its output folder) reaches main() itself
        (["distill", "--student", str(tiny_teacher_dir), "--kd", "none", "--data", text, "--block-size", "16",
          "--max-steps", "1", "--out", str(tmp_path / "s"), "--checkpoints", "/proc/kninfer/ck"],
         "cannot read or write '/proc/kninfer"),
    ]
    datasets.disable_progress_bars()  # distill tokenises before it fails: its bars would add stderr lines
    try:
        for args, expected in cases:
            _one_line_error(_main(monkeypatch, capsys, *args), expected)
    finally:
        datasets.enable_progress_bars()


def test_truncate_left_keeps_a_prompt_that_fits_and_stops_at_the_context(monkeypatch, capsys, gpt2_bundle):
    model = CausalLM(read_bundle(gpt2_bundle), threads=1)
    tokenizer = load_tokenizer(model.bundle.tokenizer_path)
    context = model.bundle.context_length
    prompt = " word" * 50 + " end"
    ids = encode(tokenizer, prompt)
    assert len(ids) == 51
    asked = generate(model, tokenizer, [prompt], Sampling(max_new_tokens=200), truncate=True)
    # the reference: no truncation, exactly the room left in the context
    room = generate(model, tokenizer, [prompt], Sampling(max_new_tokens=context - 51))
    assert asked.prompt_tokens == 51 and asked.token_ids == room.token_ids
    assert 51 + len(asked.token_ids[0]) <= context
    code, out, _ = _main(monkeypatch, capsys, "generate", str(gpt2_bundle), "--prompt", prompt, "--max-new-tokens",
                         "200", "--truncate", "left", "--threads", "1")
    assert code == 0 and out == room.texts[0] + "\n"


def test_perplexity_when_the_last_window_holds_one_token(gpt2_bundle, tiny_teacher):
    """stride = window and a text of 2 windows + 1 token: the last window predicts nothing (was a crash)."""
    from kninfer.runtime.perplexity import perplexity
    from kninfer.train.eval_lm import perplexity as torch_perplexity

    ids = np.random.default_rng(0).integers(0, 500, 2 * 32 + 1).tolist()
    result = perplexity(CausalLM(read_bundle(gpt2_bundle), threads=1), ids, stride=32, max_length=32)
    expected, tokens = torch_perplexity(tiny_teacher, torch.tensor(ids), 32, 32)
    assert result.tokens == tokens == 62 and result.perplexity == pytest.approx(expected, rel=1e-4)


def test_classify_an_unlabelled_file_prints_its_predictions(monkeypatch, capsys, sst2_bundle, files):
    code, out, _ = _main(monkeypatch, capsys, "classify", str(sst2_bundle), "--file",
                         str(files["unlabelled_tsv"]), "--threads", "1")
    assert code == 0
    rows = out.splitlines()
    args = [a for s in SENTENCES for a in ("--text", s)]
    code, names, _ = _main(monkeypatch, capsys, "classify", str(sst2_bundle), *args, "--threads", "1")
    assert code == 0 and rows == ["index\tprediction"] + [f"{i}\t{n}" for i, n in enumerate(names.split())]


def _subprocess(code: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          timeout=300)


SIGTERM_AT_STEP_2 = """
import os, signal, sys
from kninfer.train.trainer import StopOnInterrupt
def on_step_begin(self, args, state, control, **kwargs):
    if state.global_step == 1:
        os.kill(os.getpid(), signal.SIGTERM)
StopOnInterrupt.on_step_begin = on_step_begin
from kninfer.cli import main
sys.argv = ["kninfer", *sys.argv[1:]]
main()
"""


def test_sigterm_checkpoints_and_resume_skips_an_incomplete_checkpoint(monkeypatch, capsys, tiny_teacher_dir,
                                                                       files, tmp_path):
    """SIGTERM at step 2 saves checkpoint-2 and exits 130; --resume (past an empty checkpoint-3) ends where an
    uninterrupted run ends."""
    from kninfer.modeling.io import load

    args = ["distill", "--student", str(tiny_teacher_dir), "--kd", "none", "--data", str(files["text_txt"]),
            "--block-size", "16", "--batch-size", "2", "--max-steps", "4", "--logging-steps", "1", "--lr", "1e-3"]
    stopped = _subprocess(SIGTERM_AT_STEP_2, *args, "--out", str(tmp_path / "b"))
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    assert "interrupted at step 2" in stopped.stdout and "--resume" in stopped.stdout
    checkpoints = tmp_path / "b.checkpoints"
    assert json.loads((checkpoints / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2
    assert not (tmp_path / "b").exists()
    (checkpoints / "checkpoint-3").mkdir()  # what a second signal during a save leaves

    code, _, err = _main(monkeypatch, capsys, *args, "--out", str(tmp_path / "b"), "--resume")
    assert code == 0 and "skipping incomplete" in err and "checkpoint-3" in err
    code, _, _ = _main(monkeypatch, capsys, *args, "--out", str(tmp_path / "a"))
    assert code == 0
    resumed, straight = load(tmp_path / "b")[0].state_dict(), load(tmp_path / "a")[0].state_dict()
    initial = load(tiny_teacher_dir)[0].state_dict()
    # each Adam step moves a weight by about lr = 1e-3; the runs differ only in thread count (1 vs all): ~1e-6
    assert max((straight[k] - initial[k]).abs().max().item() for k in initial) > 1e-3
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=2e-5, msg=name)


BLOCKED = """
import sys
for name in ("torch", "transformers", "datasets", "onnx", "optimum", "accelerate", "safetensors", "scipy"):
    sys.modules[name] = None  # a runtime-only install: importing them raises ModuleNotFoundError
from kninfer.cli import main
sys.argv = ["kninfer", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("args", [
    ["compress", "--teacher", "gpt2", "--out", "s"], ["info", "s"],
    ["distill", "--student", "s", "--data", "d", "--out", "o"],
    ["finetune", "--model", "m", "--task", "sst2", "--out", "o"], ["pretrain", "--data", "d", "--out", "o"],
    ["eval-lm", "m", "--data", "d"], ["eval-glue", "m", "--task", "sst2"], ["export", "m", "o.onnx"],
    ["demo", "--out", "d"],
])
def test_runtime_only_install_names_the_training_extra(args):
    done = _subprocess(BLOCKED, *args)
    assert done.returncode == 2 and done.stderr == (
        f"error: 'kninfer {args[0]}' needs the training extra: pip install \"kninfer[train]\"\n"), done.stderr
