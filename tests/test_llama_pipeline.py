"""A tiny Llama (GQA, tied, a tokenizer that adds BOS) through every stage with the public API: compress -> ILKD ->
export (fp32, int8) -> generate (greedy equals transformers) -> eval (equals PyTorch); GLUE fine-tuning -> classify."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import kninfer
from kninfer.export import export
from kninfer.modeling import KnLlamaForCausalLM, compress, load, save
from kninfer.train import distill, finetune, lm_perplexity

QUIET = {"log": lambda text: None}
PROMPTS = ["The state of the Union", "We will"]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_llama, llama_tokenizer) -> Path:
    return save(tiny_llama, tmp_path_factory.mktemp("llama") / "teacher", llama_tokenizer)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, tiny_llama, teacher_dir, llama_tokenizer, text_file) -> Path:
    """The kngpt2 student of the tiny Llama after 3 ILKD steps."""
    folder = tmp_path_factory.mktemp("student")
    student, _ = compress(tiny_llama, "kngpt2")
    save(student, folder / "init", llama_tokenizer)
    distill(folder / "init", text_file, teacher=teacher_dir, kd="ilkd", block_size=32, batch_size=2, lr=1e-3,
            max_steps=3, logging_steps=1, out=folder / "ilkd", disable_tqdm=True, **QUIET)
    return folder


def test_ilkd_trains_every_term_and_changes_the_student(distilled):
    before, _ = load(distilled / "init")
    after, _ = load(distilled / "ilkd")
    assert type(after) is KnLlamaForCausalLM
    changed = [name for (name, a), (_, b) in zip(before.named_parameters(), after.named_parameters(), strict=True)
               if not torch.equal(a, b)]
    assert any(".A" in name for name in changed) and any("embed_tokens" in name for name in changed)


@pytest.mark.parametrize("variant", ["fp32", "int8"])
def test_export_generate_and_eval_match_pytorch(distilled, tmp_path, text_file, variant):
    model, tokenizer = load(distilled / "ilkd")
    report = export(distilled / "ilkd", tmp_path / "b" / "model.onnx", variant=variant, **QUIET)
    assert report.verification is not None and report.verification.max_abs_diff <= 1e-4  # fp32 graph, both variants
    lm = kninfer.load(tmp_path / "b")
    if variant == "int8":
        assert report.agreement is not None and report.agreement > 0.5
        return
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        assert ids[0, 0].item() == tokenizer.bos_token_id  # this tokenizer adds BOS: the bundle's must too
        with torch.no_grad():
            want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
        assert lm.complete([prompt], max_new_tokens=8).token_ids[0] == want
    text = text_file.read_text(encoding="utf-8")
    torch_ppl = lm_perplexity(model, text_file, tokenizer=tokenizer, block_size=64, stride=32, **QUIET)
    runtime_ppl = lm.perplexity(text, stride=32, max_length=64)
    assert runtime_ppl.tokens == torch_ppl.tokens
    assert runtime_ppl.perplexity == pytest.approx(torch_ppl.perplexity, rel=1e-4)


@pytest.mark.parametrize("name", ["teacher", "student"])
def test_glue_finetune_export_classify(teacher_dir, distilled, data_dir, tmp_path, name):
    """The dense Llama and its Kronecker student (whose classifier transformers builds around an AutoModel body)."""
    model = teacher_dir if name == "teacher" else distilled / "ilkd"
    classifier, metrics = finetune(model, "sst2", data_dir=data_dir / "glue", max_samples=32, batch_size=8,
                                   max_steps=2, lr=1e-3, max_length=32, out=tmp_path / "clf", **QUIET)
    expected = "LlamaForSequenceClassification" if name == "teacher" else "KnLlamaForSequenceClassification"
    assert type(classifier).__name__ == expected and "accuracy" in metrics["dev"]
    export(tmp_path / "clf", tmp_path / "b" / "model.onnx", task="sequence-classification", **QUIET)
    runtime = kninfer.load(tmp_path / "b")
    _, tokenizer = load(tmp_path / "clf")
    texts = ["a gripping, funny film", "dull and far too long"]
    predictions = runtime.classify(texts)
    for text, prediction in zip(texts, predictions, strict=True):
        with torch.no_grad():
            probabilities = classifier.eval()(**tokenizer(text, return_tensors="pt")).logits.softmax(-1)[0].numpy()
        assert prediction.label == classifier.config.id2label[int(probabilities.argmax())]
        np.testing.assert_allclose(prediction.score, probabilities.max(), atol=1e-5)
