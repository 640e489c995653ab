"""The demo pipeline end to end with tiny step counts: every artifact exists and loads."""

from __future__ import annotations

import json

import torch

from kninfer.demo import run_demo, sample_blocks
from kninfer.modeling import KnGPT2LMHeadModel
from kninfer.modeling.io import load
from kninfer.runtime.bundle import read_bundle


def test_sampled_blocks_come_from_the_teacher(tiny_teacher):
    blocks = sample_blocks(tiny_teacher, 3, 12, seed=0)
    assert [len(b) for b in blocks] == [12, 12, 12]
    assert blocks == sample_blocks(tiny_teacher, 3, 12, seed=0)  # seeded


def test_demo_pipeline(tmp_path, tiny_teacher_dir, data_dir):
    text = tmp_path / "heldout.txt"
    sentences = (data_dir / "sotu" / "test.txt").read_text(encoding="utf-8")[:3000].replace(". ", ".\n")
    text.write_text(sentences, encoding="utf-8")  # lines, which perplexity joins as `kninfer eval` does
    lines = []
    rows = run_demo(tmp_path / "out", str(tiny_teacher_dir), None, steps=3, block_size=32, batch_size=2, lr=1e-3,
                    prompt="The Union", eval_text=text, seed=0, log=lines.append)
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert [r["name"] for r in summary["rows"]] == [r.name for r in rows]
    teacher_row, _, student_row = rows
    assert student_row.parameters < teacher_row.parameters
    assert student_row.onnx_mb < teacher_row.onnx_mb
    assert all(r.perplexity > 1 for r in rows) and student_row.ms_per_token > 0
    student, tokenizer = load(out / "student")
    assert isinstance(student, KnGPT2LMHeadModel) and tokenizer is not None
    for name in ("teacher", "student"):
        bundle = read_bundle(out / name / "model.onnx")
        assert bundle.task == "causal-lm" and bundle.tokenizer_path.is_file()
    # the saved student is the trained one: its held-out perplexity matches the summary's
    from kninfer.train.eval_lm import eval_text, perplexity

    ids = torch.tensor(tokenizer(eval_text(str(text)))["input_ids"])
    assert abs(perplexity(student, ids, 32, 16)[0] - student_row.perplexity) / student_row.perplexity < 1e-4
    assert any("[5/5]" in line for line in lines)
