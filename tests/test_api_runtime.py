"""`kninfer.load` and its objects against transformers on tiny exported bundles: generate, stream, perplexity,
classify, and the runtime's prefill + step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_runtime import NEW_TOKENS, PROMPTS, _torch_logits

import kninfer
from kninfer.errors import KninferError
from kninfer.runtime import LanguageModel, TextClassifier
from kninfer.runtime.tokenizer import pad

TOL = 1e-4  # fp32 onnxruntime vs PyTorch, max |Δlogits|: the exporter's own verification bound


@pytest.fixture(scope="module")
def lms(tiny_teacher, kngpt2, gpt2_bundle, kngpt2_bundle) -> dict[str, tuple[torch.nn.Module, LanguageModel]]:
    """(torch model, its bundle loaded) for plain GPT-2 and KnGPT2."""
    return {"gpt2": (tiny_teacher, kninfer.load(gpt2_bundle, threads=1)),
            "kngpt2": (kngpt2, kninfer.load(kngpt2_bundle, threads=1))}


def test_load_gives_the_bundle_kind(gpt2_bundle, sst2_bundle, tmp_path):
    lm = kninfer.load(gpt2_bundle / "model.onnx")
    assert isinstance(lm, LanguageModel) and lm.info.task == "causal-lm" and lm.info.directory == gpt2_bundle
    assert lm.tokenizer.encode("Hello").ids == [15496]  # GPT-2's id for "Hello"
    assert isinstance(kninfer.load(sst2_bundle), TextClassifier)
    with pytest.raises(KninferError, match="does not exist"):
        kninfer.load(tmp_path / "nowhere")
    with pytest.raises(KninferError, match="--top-p is 0"):  # at the call, before the first piece is asked for
        lm.stream("Hi", top_p=0)


def _hf_greedy(model, tokenizer, prompts: list[str]) -> list[list[int]]:
    """transformers' greedy generate() on a left-padded batch: the new tokens of each row, cut at EOS."""
    ids, mask = pad([tokenizer.encode(p) for p in prompts], 50256, side="left")
    with torch.no_grad():
        out = model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), do_sample=False,
                             max_new_tokens=NEW_TOKENS, pad_token_id=50256)
    rows = out[:, ids.shape[1]:].tolist()
    return [row[:row.index(50256)] if 50256 in row else row for row in rows]


@pytest.mark.parametrize("kind", ["gpt2", "kngpt2"])
def test_generate_equals_transformers_greedy(lms, gpt2_tokenizer, kind):
    """Token for token, one prompt at a time and the three left-padded together; the text is their decoding."""
    torch_model, lm = lms[kind]
    for prompt in PROMPTS:
        (expected,) = _hf_greedy(torch_model, gpt2_tokenizer, [prompt])
        assert lm.complete([prompt], max_new_tokens=NEW_TOKENS).token_ids == [expected]
        assert lm.generate(prompt, max_new_tokens=NEW_TOKENS) == gpt2_tokenizer.decode(expected)
    expected = _hf_greedy(torch_model, gpt2_tokenizer, PROMPTS)
    assert lm.complete(PROMPTS, max_new_tokens=NEW_TOKENS).token_ids == expected
    assert lm.generate(PROMPTS, max_new_tokens=NEW_TOKENS) == [gpt2_tokenizer.decode(ids) for ids in expected]


def test_stream_pieces_join_to_the_generated_text(lms):
    _, lm = lms["gpt2"]
    full = lm.generate(PROMPTS[0], max_new_tokens=2 * NEW_TOKENS)
    stop = full[len(full) // 2:len(full) // 2 + 3]
    for options in ({}, {"temperature": 1.0, "top_k": 40, "seed": 3}, {"stop": stop}):
        stream = lm.stream(PROMPTS[0], max_new_tokens=2 * NEW_TOKENS, **options)
        first = next(stream)
        assert stream.result.new_tokens < 2 * NEW_TOKENS  # handed out while decoding goes on
        pieces = [first, *stream]
        expected = lm.generate(PROMPTS[0], max_new_tokens=2 * NEW_TOKENS, **options)
        assert "".join(pieces) == expected == stream.result.texts[0] and len(pieces) > 1
    assert expected == full[:full.index(stop)]


def _torch_perplexity(model, ids: list[int], max_length: int, stride: int) -> tuple[float, int]:
    """The Hugging Face sliding-window recipe, each window's mean loss weighted by its scored tokens; and the count."""
    nll, count, previous_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        window = torch.tensor([ids[begin:end]])
        labels = window.clone()
        labels[:, :-(end - previous_end)] = -100
        scored = int((labels[:, 1:] != -100).sum())
        with torch.no_grad():
            nll += model(window, labels=labels).loss.item() * scored
        count, previous_end = count + scored, end
        if end == len(ids):
            break
    return float(np.exp(nll / count)), count


@pytest.mark.parametrize("kind", ["gpt2", "kngpt2"])
def test_perplexity_equals_torch(lms, data_dir, gpt2_tokenizer, kind):
    torch_model, lm = lms[kind]
    text = (data_dir / "wikitext-2-raw" / "wiki.valid.raw").read_text(encoding="utf-8")[:1000]
    ids = gpt2_tokenizer.encode(text)
    # overlapping windows with a short last one; disjoint windows; windows shorter than the context
    for max_length, stride in ((None, 40), (None, 128), (64, 16)):
        result = lm.perplexity(text, stride=stride, max_length=max_length)
        expected, tokens = _torch_perplexity(torch_model, ids, max_length or lm.info.context_length, stride)
        assert result.perplexity == pytest.approx(expected, rel=1e-3) and result.tokens == tokens


def test_classify_equals_the_torch_classifiers_argmax(sst2_classifier, sst2_bundle, gpt2_tokenizer, data_dir,
                                                      tmp_path):
    from kninfer.runtime.tasks import TASKS, read_glue_tsv

    classifier = kninfer.load(sst2_bundle, threads=1)
    lines = (data_dir / "glue" / "SST-2" / "dev.tsv").read_text(encoding="utf-8").splitlines()[:41]
    (tmp_path / "dev.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    inputs, gold = read_glue_tsv(tmp_path / "dev.tsv", TASKS["sst2"])
    logits = _torch_logits(sst2_classifier, gpt2_tokenizer, inputs)
    names = [["negative", "positive"][i] for i in logits.argmax(-1)]
    probability = torch.softmax(torch.from_numpy(logits), -1).max(-1).values.numpy()

    found = classifier.classify([text for (text,) in inputs], batch_size=8)
    assert [p.label for p in found] == names
    np.testing.assert_allclose([p.score for p in found], probability, atol=TOL)
    assert classifier.classify(inputs[0][0]).label == names[0]

    pairs = [("A man is playing a guitar.", "Someone plays music."), ("Short.", "A much longer second sentence here.")]
    pair_logits = _torch_logits(sst2_classifier, gpt2_tokenizer, pairs)
    found = classifier.classify([a for a, _ in pairs], [b for _, b in pairs])
    assert [p.label for p in found] == [["negative", "positive"][i] for i in pair_logits.argmax(-1)]
    with pytest.raises(KninferError, match="1 pairs for 2 texts"):
        classifier.classify([a for a, _ in pairs], [pairs[0][1]])

    scored = classifier.classify_tsv(tmp_path / "dev.tsv", progress=lambda done, total: None)
    assert scored.task == "sst2" and [p.label for p in scored.predictions] == names
    assert scored.metrics == {"accuracy": pytest.approx(float(np.mean(logits.argmax(-1) == gold)))}


@pytest.mark.parametrize("kind", ["gpt2", "kngpt2"])
def test_prefill_and_steps_equal_pytorch(lms, kind):
    """A left-padded pair, prefilled, then 3 greedy cached steps: each row's logits equal PyTorch's on that row
    alone, unpadded and uncached, within 1e-4."""
    torch_model, lm = lms[kind]
    rows = [[464, 3139, 286, 4881, 318, 6342], [15496, 11, 616]]
    ids, mask = pad(rows, lm.info.pad_token_id, side="left")
    logits, cache = lm.session.prefill(ids, mask)
    for step in range(4):
        if step:
            tokens = logits[:, -1].argmax(-1)
            rows = [row + [token] for row, token in zip(rows, tokens.tolist(), strict=True)]
            mask = np.concatenate([mask, np.ones((len(rows), 1), np.int64)], axis=1)
            logits, cache = lm.session.step(tokens[:, None].astype(np.int64), mask, cache)
        for number, row in enumerate(rows):
            with torch.no_grad():
                expected = torch_model(torch.tensor([row])).logits[0].numpy()
            real = expected[-logits.shape[1]:] if step else expected  # the new positions, or the whole prompt
            got = logits[number, -len(real):]
            np.testing.assert_allclose(got, real, atol=TOL)
