"""The embedded teacher: small enough to ship, and its committed perplexity reproduces."""

from __future__ import annotations

import json

import pytest
import torch

from kninfer.demo import EMBEDDED_TEACHER, HELDOUT_TEXT
from kninfer.modeling.io import load
from kninfer.train.eval_lm import eval_text, perplexity

TEACHER = EMBEDDED_TEACHER
RESULTS = TEACHER / "eval.json"


def test_teacher_ships_small_fp16_weights():
    weights = TEACHER / "model.safetensors"
    assert weights.stat().st_size <= 12.5e6
    model, tokenizer = load(str(TEACHER))
    assert model.config.n_layer % 2 == 0 and tokenizer is not None
    assert tokenizer.decode(tokenizer("Fellow-Citizens, ünïcode ✓")["input_ids"]) == "Fellow-Citizens, ünïcode ✓"


def test_committed_heldout_perplexity_reproduces():
    committed = json.loads(RESULTS.read_text())["heldout"]
    model, tokenizer = load(str(TEACHER))
    ids = torch.tensor(tokenizer(eval_text(str(HELDOUT_TEXT)))["input_ids"])
    value, tokens = perplexity(model, ids, committed["block_size"], committed["stride"])
    assert tokens == committed["tokens"]
    assert value == pytest.approx(committed["perplexity"], rel=1e-4)
