"""The README's "## Python API" blocks, run as written (2 distillation steps instead of 20, the test data folder for
../shared/data/sotu) and checked against transformers on the same torch objects."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
HEADING = "## Python API"


def _section(heading: str) -> str:
    """The README text from `heading` to the next level-2 heading."""
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"^{re.escape(heading)}\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, f"README.md has no section '{heading}'"
    return match.group(1)


def _blocks() -> tuple[str, str, str]:
    """The section's ```python blocks: the torch side, the bundle side, the classifier."""
    blocks = re.findall(r"^```python\n(.*?)^```$", _section(HEADING), flags=re.M | re.S)
    assert len(blocks) == 3, f"expected 3 python blocks under '{HEADING}', found {len(blocks)}"
    return blocks[0], blocks[1], blocks[2]


def _replace(code: str, old: str, new: str) -> str:
    """`code` with its one `old` replaced: a README edit that drops it fails here, not silently."""
    assert code.count(old) == 1, f"expected {old!r} once in the README block"
    return code.replace(old, new)


def _run(code: str, name: str) -> dict:
    """Execute a README block in a fresh namespace and return it."""
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(code, f"README.md ({name})", "exec"), namespace)
    return namespace


def test_the_section_follows_the_pipeline_section():
    headings = re.findall(r"^## .*$", README.read_text(encoding="utf-8"), flags=re.M)
    assert headings[headings.index("## The pipeline, step by step") + 1] == HEADING


def test_readme_pipeline_runs_and_its_bundle_matches_transformers(data_dir, tmp_path, monkeypatch):
    train_code, run_code, _ = _blocks()
    train_code = _replace(train_code, '"../shared/data/sotu"', repr(str(data_dir / "sotu")))
    train_code = _replace(train_code, "max_steps=20", "max_steps=2")
    monkeypatch.chdir(tmp_path)
    trained = _run(train_code, "torch side")
    student, tokenizer, report = trained["student"], trained["tokenizer"], trained["report"]
    assert type(student).__name__ == "KnGPT2LMHeadModel" and not student.training
    assert (tmp_path / report.onnx_path).resolve() == (tmp_path / "bundle" / "model.onnx").resolve()

    ran = _run(run_code, "bundle side")
    lm, prompt = ran["lm"], ran["prompt"]
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    eos = student.config.eos_token_id
    with torch.no_grad():
        out = student.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20,
                               pad_token_id=eos)
    expected = out[0, ids.shape[1]:].tolist()
    expected = expected[:expected.index(eos)] if eos in expected else expected
    assert expected, "the student's greedy continuation is empty: nothing to compare"
    assert lm.tokenizer.encode(prompt).ids == ids[0].tolist()
    assert lm.complete([prompt], max_new_tokens=20).token_ids == [expected]
    greedy = lm.generate(prompt, max_new_tokens=20)
    assert greedy == tokenizer.decode(expected)
    assert ran["stream"].result.texts == [greedy]  # the README's stream ran to its end, greedily

    text_ids = tokenizer(ran["text"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        nll = student(text_ids, labels=text_ids).loss.item()  # one window: every token after the first
    assert ran["ppl"].tokens == text_ids.shape[1] - 1
    assert ran["ppl"].nll == pytest.approx(nll, abs=1e-4)
    assert ran["ppl"].perplexity == pytest.approx(math.exp(nll), rel=1e-4)

    # the bundle side as a program of its own imports no torch
    check = run_code + "\nimport sys\nassert 'torch' not in sys.modules, 'the runtime imported torch'\n"
    done = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(greedy + "\n")


def test_readme_classifier_labels_equal_torch_argmax(sst2_bundle, sst2_classifier, gpt2_tokenizer, tmp_path,
                                                     monkeypatch):
    *_, classify_code = _blocks()
    shutil.copytree(sst2_bundle, tmp_path / "clf")
    monkeypatch.chdir(tmp_path)
    ran = _run(classify_code, "classifier")
    texts, predictions = ran["texts"], ran["predictions"]
    assert len(predictions) == len(texts) >= 2
    for text, prediction in zip(texts, predictions, strict=True):
        with torch.no_grad():
            logits = sst2_classifier(torch.tensor([gpt2_tokenizer(text)["input_ids"]])).logits[0]
        probs = logits.softmax(-1)
        assert prediction.label == sst2_classifier.config.id2label[int(probs.argmax())]
        assert prediction.score == pytest.approx(probs.max().item(), abs=1e-4)
