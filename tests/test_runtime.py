"""The torch-free runtime's parts on tiny exported bundles: sessions, sampling, streaming, the window rule,
classification against transformers, bad bundles, the CLI and the import boundary (the public API against
transformers: test_api_runtime.py)."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import kninfer
from kninfer.errors import KninferError
from kninfer.runtime.bundle import file_sha256, read_bundle
from kninfer.runtime.classify import classify, predictions
from kninfer.runtime.generate import Generation, Sampling, TextStream, generate, next_tokens
from kninfer.runtime.perplexity import windows
from kninfer.runtime.session import CausalLM, Classifier
from kninfer.runtime.tokenizer import decode, encode, load_tokenizer

PROMPTS = ["Hello, my name is", "The capital of France", "In 1905 Einstein published four papers on"]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def lm(gpt2_bundle):
    """The tiny GPT-2 bundle, loaded."""
    return kninfer.load(gpt2_bundle, threads=1)


def test_low_memory_session_gives_the_same_logits(kngpt2_bundle):
    """--low-memory only turns off weight pre-packing: same logits as the default session (atol 1e-5)."""
    default, lean = (CausalLM(read_bundle(kngpt2_bundle), threads=1, low_memory=low) for low in (False, True))
    assert lean.session.get_session_options().get_session_config_entry("session.disable_prepacking") == "1"
    ids = np.array([[5, 17, 300, 2]], np.int64)
    np.testing.assert_allclose(lean.prefill(ids, np.ones_like(ids))[0], default.prefill(ids, np.ones_like(ids))[0],
                               atol=1e-5)


def test_low_memory_keeps_packing_for_block_quantized_graphs(kngpt2_bundle, tmp_path):
    """int8/int4 (MatMulNBits) sessions keep pre-packing under --low-memory; int8-dynamic turns it off."""
    from kninfer.export import quantize_bundle

    for variant in ("int4", "int8", "int8-dynamic"):
        report = quantize_bundle(kngpt2_bundle, tmp_path / variant / "model.onnx", variant=variant)
        options = CausalLM(read_bundle(report.onnx_path), threads=1, low_memory=True).session.get_session_options()
        if variant == "int8-dynamic":
            assert options.get_session_config_entry("session.disable_prepacking") == "1"
        else:
            with pytest.raises(RuntimeError, match="does not have configuration"):
                options.get_session_config_entry("session.disable_prepacking")


def test_sampling_seeded_and_top_k_1_is_greedy(lm):
    model, tokenizer = lm.session, lm.tokenizer
    greedy = generate(model, tokenizer, PROMPTS, Sampling(max_new_tokens=NEW_TOKENS)).token_ids
    top1 = generate(model, tokenizer, PROMPTS, Sampling(max_new_tokens=NEW_TOKENS, temperature=1.5, top_k=1, seed=3))
    assert top1.token_ids == greedy
    sampled = Sampling(max_new_tokens=NEW_TOKENS, temperature=1.0, top_p=0.9, repetition_penalty=1.3, seed=7)
    first, again = (generate(model, tokenizer, PROMPTS, sampled).token_ids for _ in range(2))
    assert first == again
    other = generate(model, tokenizer, PROMPTS, dataclasses.replace(sampled, seed=8))
    assert other.token_ids != first  # a random tiny model's distribution is near uniform: seeds differ


def test_sampling_distribution_matches_transformers_processors():
    """Repetition penalty, temperature, top-k and top-p give transformers' distribution (4000 draws, 4 sigma)."""
    from transformers import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = np.random.default_rng(0).normal(size=(1, 40)).astype(np.float32) * 2
    history = [3, 7, 7, 21]
    scores = torch.from_numpy(logits.copy())
    for processor in (RepetitionPenaltyLogitsProcessor(1.3), TemperatureLogitsWarper(0.7), TopKLogitsWarper(10),
                      TopPLogitsWarper(0.8)):
        scores = processor(torch.tensor([history]), scores)
    expected = torch.softmax(scores, -1)[0].numpy()
    sampling = Sampling(temperature=0.7, top_k=10, top_p=0.8, repetition_penalty=1.3)
    draws = next_tokens(np.repeat(logits, 4000, 0), [history] * 4000, sampling, np.random.default_rng(1))
    frequencies = np.bincount(draws, minlength=40) / 4000
    assert set(np.flatnonzero(frequencies)) <= set(np.flatnonzero(expected))
    np.testing.assert_allclose(frequencies, expected, atol=4 * 0.5 / np.sqrt(4000))


def test_stream_holds_back_partial_characters_and_stop_prefixes():
    steps = [Generation(texts=[text], token_ids=[[]], prompt_tokens=1) for text in ("Hi \ufffd", "Hi é ST", "Hi é STx")]
    assert list(TextStream(iter(steps), ("STOP",))) == ["Hi ", "é ", "STx"]
    ends_held = [Generation(texts=[text], token_ids=[[]], prompt_tokens=1) for text in ("a", "a S", "a ST\ufffd")]
    stream = TextStream(iter(ends_held), ("STOP",))
    assert list(stream) == ["a", " ", "ST\ufffd"] and stream.result is ends_held[-1]  # the end releases the rest


def test_truncate_left_and_context_limit(lm):
    model, tokenizer = lm.session, lm.tokenizer
    context = model.bundle.context_length
    long_prompt = " word" * (context + 10)
    with pytest.raises(KninferError, match="context"):
        generate(model, tokenizer, [long_prompt], Sampling(max_new_tokens=4))
    result = generate(model, tokenizer, [long_prompt], Sampling(max_new_tokens=4), truncate=True)
    assert result.prompt_tokens == context - 4 and len(result.token_ids[0]) == 4
    near_full = " word" * (context - 3)  # room for 3 new tokens only
    assert len(generate(model, tokenizer, [near_full], Sampling(max_new_tokens=10)).token_ids[0]) == 3


def test_tokenizer_round_trips_utf8(gpt2_bundle, gpt2_tokenizer):
    tokenizer = load_tokenizer(read_bundle(gpt2_bundle).tokenizer_path)
    text = "Grüße, 世界! 🤖 <|endoftext|> tabs\tand\nnewlines  "
    assert encode(tokenizer, text) == gpt2_tokenizer.encode(text)
    assert decode(tokenizer, encode(tokenizer, text)) == text


@pytest.mark.parametrize("max_length, stride", [(8, 3), (8, 8), (8, 1), (30, 7)])
def test_windows_score_what_the_hugging_face_recipe_scores(max_length, stride):
    """The positions each window scores are those the recipe's labels leave unmasked after the shift."""
    for n_tokens in (2, 9, 17, 25):
        recipe, previous_end = [], 0
        for begin in range(0, n_tokens, stride):
            end = min(begin + max_length, n_tokens)
            labels = list(range(begin, end))
            labels[:-(end - previous_end)] = [-100] * (len(labels) - (end - previous_end))
            recipe.append([t for t in labels[1:] if t != -100])  # labels shift left: the window's first is unscored
            previous_end = end
            if end == n_tokens:
                break
        scored = [list(range(first, end)) for _, end, first in windows(n_tokens, max_length, stride)]
        assert scored == [r for r in recipe if r]
        assert all(end - begin <= max_length for begin, end, _ in windows(n_tokens, max_length, stride))


def test_runtime_imports_neither_torch_nor_transformers(gpt2_bundle, sst2_bundle):
    """`kninfer.load` and its objects, and `kninfer generate`, run in a process where importing torch,
    transformers, optimum or onnx fails; `import kninfer` alone does not import onnxruntime."""
    code = (
        "import sys\n"
        "for name in ('torch', 'transformers', 'optimum', 'onnx'):\n"
        "    sys.modules[name] = None  # any import of them now raises ImportError\n"
        "import kninfer\n"
        "assert 'onnxruntime' not in sys.modules\n"
        f"lm = kninfer.load({str(gpt2_bundle)!r})\n"
        "assert ''.join(lm.stream('Hello', max_new_tokens=5)) == lm.generate('Hello', max_new_tokens=5)\n"
        "text = 'Hello there, general Kenobi'\n"
        "assert lm.perplexity(text).tokens == len(lm.tokenizer.encode(text).ids) - 1\n"
        f"print(kninfer.load({str(sst2_bundle)!r}).classify('a fine film').label)\n"
        "from kninfer.cli import main\n"
        f"sys.argv = ['kninfer', 'generate', {str(gpt2_bundle)!r}, '--prompt', 'Hello', '--max-new-tokens', '5']\n"
        "main()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] in ("negative", "positive") and "5 new tokens" in done.stderr


def test_importing_kninfer_or_its_models_does_not_import_onnxruntime():
    code = "import sys, kninfer, kninfer.modeling, kninfer.runtime.tasks; assert 'onnxruntime' not in sys.modules"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """Run `kninfer ARGS` in a fresh process."""
    return subprocess.run([sys.executable, "-c", "from kninfer.cli import main; main()", *args],
                          capture_output=True, text=True, input=stdin, timeout=120)


def test_cli_generate_stdin_and_batch(gpt2_bundle, lm):
    expected = lm.generate(PROMPTS[:2], max_new_tokens=6)
    onnx_file = str(gpt2_bundle / "model.onnx")
    piped = _cli("generate", onnx_file, "--prompt", "-", "--max-new-tokens", "6", stdin=PROMPTS[0])
    assert piped.returncode == 0 and piped.stdout == expected[0] + "\n"
    assert piped.stderr.startswith("prompt 5 tokens, 6 new tokens, prefill ") and piped.stderr.count("\n") == 1
    assert piped.stderr.endswith(" tokens/s\n")
    batch = _cli("generate", str(gpt2_bundle), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--max-new-tokens", "6")
    assert batch.returncode == 0 and batch.stdout == f"[1] {expected[0]}\n[2] {expected[1]}\n"


def _broken_bundles(source: Path, root: Path) -> dict[str, tuple[Path, str]]:
    """Bundle copies, each broken one way, with the text its error line must contain."""
    cases = {}
    for name in ("no_json", "bad_json", "wrong_format", "corrupt_onnx", "no_weights", "no_tokenizer", "wrong_layers"):
        shutil.copytree(source, root / name)
        cases[name] = root / name
    (cases["no_json"] / "kninfer.json").unlink()
    (cases["bad_json"] / "kninfer.json").write_text("{not json")
    meta = json.loads((source / "kninfer.json").read_text())
    (cases["wrong_format"] / "kninfer.json").write_text(json.dumps({**meta, "format_version": 99}))
    (cases["corrupt_onnx"] / "model.onnx").write_bytes(b"\x00garbage" * 100)
    _edit_entry(cases["corrupt_onnx"], onnx_sha256=file_sha256(cases["corrupt_onnx"] / "model.onnx"))
    weights = read_bundle(source).data_path.name
    (cases["no_weights"] / weights).unlink()
    (cases["no_tokenizer"] / "tokenizer.json").unlink()
    _edit_entry(cases["wrong_layers"], kv_cache={**meta["models"]["model.onnx"]["kv_cache"], "num_layers": 2})
    return {
        "missing": (root / "nowhere", "does not exist"),
        "no_json": (cases["no_json"], "kninfer.json' is missing"),
        "bad_json": (cases["bad_json"], "not valid JSON"),
        "wrong_format": (cases["wrong_format"], "format_version 99"),
        "corrupt_onnx": (cases["corrupt_onnx"], "not a loadable ONNX model"),
        "no_weights": (cases["no_weights"], f"{weights}' is missing"),
        "no_tokenizer": (cases["no_tokenizer"], "tokenizer.json' is missing"),
        "wrong_layers": (cases["wrong_layers"], "does not match its kninfer.json"),
    }


def _edit_entry(folder: Path, **fields) -> None:
    """Set fields of model.onnx's entry in the folder's kninfer.json."""
    meta = json.loads((folder / "kninfer.json").read_text())
    meta["models"]["model.onnx"].update(fields)
    (folder / "kninfer.json").write_text(json.dumps(meta))


def test_bad_bundles_raise_clear_errors(gpt2_bundle, tmp_path):
    for path, expected in _broken_bundles(gpt2_bundle, tmp_path).values():
        with pytest.raises(KninferError, match=expected):
            kninfer.load(path)
    with pytest.raises(KninferError, match="classify needs sequence-classification"):
        Classifier(read_bundle(gpt2_bundle))
    with pytest.raises(KninferError, match="--top-p is 0"):
        Sampling(top_p=0).check()


def test_cli_bad_input_is_one_line_exit_2(gpt2_bundle, tmp_path):
    broken = _broken_bundles(gpt2_bundle, tmp_path)
    runs = [(_cli("generate", str(broken[name][0]), "--prompt", "Hi"), broken[name][1])
            for name in ("missing", "bad_json", "corrupt_onnx", "no_weights", "wrong_layers")]
    runs.append((_cli("generate", str(gpt2_bundle), "--prompt", ""), "prompt 1 is empty"))
    runs.append((_cli("generate", str(gpt2_bundle), "--prompt", " x" * 200), "context is 128"))
    runs.append((_cli("eval", str(gpt2_bundle), "--text-file", str(tmp_path / "none.txt")), "cannot read"))
    for done, expected in runs:
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ") and expected in done.stderr
        assert done.stdout == ""


def test_cli_eval_matches_torch_eval_lm(gpt2_bundle, tiny_teacher, gpt2_tokenizer, tmp_path, data_dir):
    """`kninfer eval` on a file equals the torch side's eval-lm (its text loading and perplexity) within 1e-3."""
    from kninfer.train.data import load_lm_text
    from kninfer.train.eval_lm import perplexity as torch_perplexity

    lines = (data_dir / "moby-dick" / "moby-dick.txt").read_text(encoding="utf-8").splitlines(keepends=True)[:60]
    (tmp_path / "t.txt").write_text("".join(lines), encoding="utf-8")
    ids = gpt2_tokenizer("\n\n".join(load_lm_text(str(tmp_path / "t.txt"))["text"]))["input_ids"]
    expected, tokens = torch_perplexity(tiny_teacher, torch.tensor(ids), 128, 32)
    done = _cli("eval", str(gpt2_bundle), "--text-file", str(tmp_path / "t.txt"), "--stride", "32")
    assert done.returncode == 0, done.stderr
    assert float(done.stdout.split()[1]) == pytest.approx(expected, rel=1e-3)
    assert f"over {tokens} tokens" in done.stdout



def _torch_logits(model, tokenizer, inputs: list[tuple[str, ...]]) -> np.ndarray:
    """The torch classifier on a right-padded batch, built as fine-tuning builds its inputs."""
    from kninfer.runtime.tasks import input_text

    tokenizer = copy.deepcopy(tokenizer)  # the session fixture stays unpadded for other tests
    tokenizer.pad_token, tokenizer.padding_side = tokenizer.eos_token, "right"
    batch = tokenizer([input_text(t) for t in inputs], padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits.numpy()


def test_classify_matches_torch_classifier(sst2_classifier, sst2_bundle, gpt2_tokenizer, data_dir, tmp_path):
    from kninfer.runtime.tasks import TASKS, read_glue_tsv

    model = Classifier(read_bundle(sst2_bundle), threads=1)
    tokenizer = load_tokenizer(model.bundle.tokenizer_path)
    lines = (data_dir / "glue" / "SST-2" / "dev.tsv").read_text(encoding="utf-8").splitlines()[:41]
    (tmp_path / "dev.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    inputs, gold = read_glue_tsv(tmp_path / "dev.tsv", TASKS["sst2"])
    expected = _torch_logits(sst2_classifier, gpt2_tokenizer, inputs)
    logits = classify(model, tokenizer, inputs, batch_size=8)
    np.testing.assert_allclose(logits, expected, atol=1e-4)
    names = [p.label for p in predictions(logits, model.bundle.labels)]
    assert names == [["negative", "positive"][i] for i in expected.argmax(-1)]

    pairs = [("A man is playing a guitar.", "Someone plays music."), ("Short.", "A much longer second sentence here.")]
    np.testing.assert_allclose(classify(model, tokenizer, pairs), _torch_logits(sst2_classifier, gpt2_tokenizer, pairs),
                               atol=1e-4)

    done = _cli("classify", str(sst2_bundle), "--file", str(tmp_path / "dev.tsv"), "--out", str(tmp_path / "p.tsv"))
    assert done.returncode == 0, done.stderr
    accuracy = float(np.mean(expected.argmax(-1) == gold))
    assert done.stdout == f"sst2 dev.tsv: accuracy {accuracy:.4f} (40 rows)\n"
    rows = (tmp_path / "p.tsv").read_text().splitlines()
    assert rows[0] == "index\tprediction" and rows[1:] == [f"{i}\t{n}" for i, n in enumerate(names)]
    texts = _cli("classify", str(sst2_bundle), "--text", inputs[0][0], "--text", inputs[1][0])
    assert texts.returncode == 0 and texts.stdout.split() == names[:2]


def test_classify_cuts_inputs_where_fine_tuning_did(sst2_classifier, gpt2_tokenizer, export_tiny, tmp_path):
    """A bundle whose classifier was fine-tuned on 8-token inputs scores the first 8 tokens, as torch does."""
    classifier = copy.deepcopy(sst2_classifier)
    classifier.config.max_input_length = 8
    model = Classifier(read_bundle(export_tiny(classifier, tmp_path, task="sequence-classification")))
    assert model.bundle.max_input_length == 8
    text = "an unexpectedly moving film whose second half drags on for far too long"
    ids = gpt2_tokenizer(text)["input_ids"]
    with torch.no_grad():
        cut, whole = (classifier(torch.tensor([i])).logits.numpy() for i in (ids[:8], ids))
    assert np.abs(cut - whole).max() > 1e-3  # the cut changes the answer, so the check below can fail
    np.testing.assert_allclose(classify(model, load_tokenizer(model.bundle.tokenizer_path), [(text,)]), cut, atol=1e-4)
