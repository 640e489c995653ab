"""Chat and special tokens, against transformers: the chat template rendered and tokenized as
`apply_chat_template`, a tokenizer.json's BOS as `tokenizer(text)`, `LanguageModel.chat` as greedy `generate` and
the torch model, the `kninfer chat` and `generate --chat` commands, the export carrying the template."""

from __future__ import annotations

import ast
import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cli_errors import _main, _one_line_error
from tokenizers import Tokenizer, processors
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

import kninfer
from kninfer.errors import KninferError
from kninfer.runtime.chat import chat_template
from kninfer.runtime.generate import Sampling, generate
from kninfer.runtime.tokenizer import encode

SMOLLM2 = (  # SmolLM2-Instruct's template
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA_LIKE = (  # bos_token, eos_token, tojson and raise_exception, as Llama-2-style templates use them
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.first and system %}{{ '<<SYS>>' + system | tojson + '<</SYS>>\n' }}{% endif %}"
    "{{ '[' + message['role'] + '] ' + message['content'] | tojson + eos_token + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "A <b>joke</b> & more, é 世界"}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "a"},
     {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
]
IM_START, IM_END, BOS = 50257, 50258, 50259  # special tokens added after GPT-2's vocabulary
NEW_TOKENS = 6


def _chat_tokenizer(gpt2_tokenizer, single: str = "<s> $A") -> Tokenizer:
    """GPT-2's tokenizer with <|im_start|>, <|im_end|>, <s>, and a post-processor adding <s> (a Llama BOS)."""
    tokenizer = Tokenizer.from_str(gpt2_tokenizer.backend_tokenizer.to_str())
    tokenizer.add_special_tokens(["<|im_start|>", "<|im_end|>", "<s>"])
    tokenizer.post_processor = processors.TemplateProcessing(single=single,
                                                             special_tokens=[("<s>", BOS), ("<|im_end|>", IM_END)])
    return tokenizer


def _hf(tokenizer: Tokenizer, template: str | None = None) -> PreTrainedTokenizerFast:
    """transformers' tokenizer over the same tokenizer.json, with the bundle's special tokens."""
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="<|im_end|>",
                                   chat_template=template)


@pytest.fixture(scope="module")
def chat_model() -> GPT2LMHeadModel:
    """A random tiny GPT-2 over the chat tokenizer's vocabulary, EOS <|im_end|> (as SmolLM2), BOS <s>."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50260, n_positions=128, n_embd=32, n_layer=2, n_head=4, bos_token_id=BOS,
                        eos_token_id=IM_END)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def chat_bundle(tmp_path_factory, chat_model, gpt2_tokenizer) -> Path:
    """The chat model exported with the chat tokenizer and SmolLM2's template."""
    from kninfer.export.bundle import export_bundle

    folder = tmp_path_factory.mktemp("chat")
    export_bundle(chat_model, folder / "model.onnx", tokenizer_json=_chat_tokenizer(gpt2_tokenizer).to_str(),
                  verify=False, chat_template=SMOLLM2)
    return folder


@pytest.fixture(scope="module")
def lm(chat_bundle):
    return kninfer.load(chat_bundle, threads=1)


@pytest.mark.parametrize("template", [SMOLLM2, LLAMA_LIKE], ids=["smollm2", "llama-like"])
def test_rendered_prompt_and_ids_equal_apply_chat_template(lm, template):
    hf = _hf(lm.tokenizer, template)
    ours = chat_template(dataclasses.replace(lm.info, meta={**lm.info.meta, "chat_template": template}), lm.tokenizer)
    for messages in CONVERSATIONS:
        assert ours.render(messages) == hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert ours.ids(messages) == hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert ours.ids(CONVERSATIONS[0]).count(BOS) == (template == LLAMA_LIKE)  # the template's own, never a second


def test_a_template_error_or_no_template_is_one_line(lm, gpt2_bundle):
    meta = {**lm.info.meta, "chat_template": LLAMA_LIKE}
    ours = chat_template(dataclasses.replace(lm.info, meta=meta), lm.tokenizer)
    with pytest.raises(KninferError, match="failed: Conversation roles must alternate"):
        ours.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(KninferError, match="not valid Jinja"):
        chat_template(dataclasses.replace(lm.info, meta={**meta, "chat_template": "{% for %}"}), lm.tokenizer)
    with pytest.raises(KninferError, match=r"message 1 is .*expected \{'role': str, 'content': str\}"):
        lm.chat([{"role": "user"}])
    with pytest.raises(KninferError, match="has no chat template: use `kninfer generate`"):
        kninfer.load(gpt2_bundle).chat(CONVERSATIONS[0])


@pytest.mark.parametrize("single", ["<s> $A", "<s> $A <|im_end|>"], ids=["bos", "bos-and-eos"])
def test_plain_text_gets_the_post_processors_special_tokens(gpt2_tokenizer, single):
    """As transformers' tokenizer(text), truncation included: the special tokens stay, the text is cut."""
    tokenizer = _chat_tokenizer(gpt2_tokenizer, single)
    hf = _hf(tokenizer)
    text = "The state of the Union is strong, and getting stronger."
    assert encode(tokenizer, text) == hf(text).input_ids and encode(tokenizer, text)[0] == BOS
    assert encode(tokenizer, text, special_tokens=False) == hf(text, add_special_tokens=False).input_ids
    assert encode(tokenizer, text, max_length=5) == hf(text, truncation=True, max_length=5).input_ids
    hf.truncation_side = "left"
    assert encode(tokenizer, text, max_length=5, side="left") == hf(text, truncation=True, max_length=5).input_ids


def test_prompts_and_perplexity_count_the_bos_once(lm, chat_model):
    """A plain prompt gets the BOS (greedy tokens as the torch model's on transformers' ids); perplexity scores
    every token after it once."""
    prompt = "The capital of France"
    ids = _hf(lm.tokenizer)(prompt).input_ids
    with torch.no_grad():
        out = chat_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                  do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=IM_END)
    expected = out[0, len(ids):].tolist()
    result = lm.complete([prompt], max_new_tokens=NEW_TOKENS)
    assert result.prompt_tokens == len(ids) and result.token_ids == [expected[:expected.index(IM_END)]
                                                                       if IM_END in expected else expected]
    assert lm.perplexity(prompt).tokens == len(ids) - 1


def test_chat_equals_greedy_generate_and_the_torch_model(lm, chat_model):
    hf = _hf(lm.tokenizer, SMOLLM2)
    for messages in CONVERSATIONS:
        assert lm.fit_conversation(messages, NEW_TOKENS) == messages
        reply = lm.chat(messages, max_new_tokens=NEW_TOKENS)
        rendered = lm.chat_template.render(messages)
        assert reply == generate(lm.session, lm.tokenizer, [rendered], Sampling(max_new_tokens=NEW_TOKENS),
                                 special_tokens=False).texts[0]
        stream = lm.chat_stream(messages, max_new_tokens=NEW_TOKENS)
        assert "".join(stream) == reply
        ids = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        with torch.no_grad():
            out = chat_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=IM_END)
        assert stream.result.token_ids == [out[0, len(ids):].tolist()]


def test_chat_stops_at_eos(lm, chat_bundle, tmp_path):
    """The reply ends before the bundle's EOS (made here a token the greedy reply reaches), which is not output."""
    stream = lm.chat_stream(CONVERSATIONS[0], max_new_tokens=NEW_TOKENS)
    assert "".join(stream) == lm.chat(CONVERSATIONS[0], max_new_tokens=NEW_TOKENS)
    tokens = stream.result.token_ids[0]
    shutil.copytree(chat_bundle, tmp_path / "b")
    meta_path = tmp_path / "b" / "kninfer.json"
    meta = json.loads(meta_path.read_text())
    meta["models"]["model.onnx"]["eos_token_id"] = tokens[3]
    meta_path.write_text(json.dumps(meta))
    stopped = kninfer.load(tmp_path / "b", threads=1).chat(CONVERSATIONS[0], max_new_tokens=NEW_TOKENS)
    assert stopped == lm.tokenizer.decode(tokens[:tokens.index(tokens[3])], skip_special_tokens=False)


def test_fit_conversation_drops_the_oldest_turns(lm):
    system = {"role": "system", "content": "Be kind."}
    turns = [{"role": role, "content": f"{role} message number {n} here"} for n in range(6)
             for role in ("user", "assistant")]
    messages = [system, *turns, {"role": "user", "content": "and the last one"}]
    budget = lm.info.context_length - NEW_TOKENS
    kept = lm.fit_conversation(messages, NEW_TOKENS)
    assert len(kept) < len(messages) and kept[0] == system and kept[1]["role"] == "user"
    assert kept[1:] == messages[len(messages) - len(kept) + 1:]
    assert len(lm.chat_template.ids(kept)) <= budget < len(lm.chat_template.ids([system, *messages[-len(kept) - 1:]]))
    with pytest.raises(KninferError, match="the last message does not fit: its prompt has .* context is 128"):
        lm.fit_conversation([system, {"role": "user", "content": "word " * 150}], NEW_TOKENS)


def test_cli_chat_keeps_the_conversation_and_resets(monkeypatch, capsys, lm, chat_bundle):
    first = {"role": "user", "content": "Hello there"}
    reply = lm.chat([first], max_new_tokens=NEW_TOKENS)
    second = [first, {"role": "assistant", "content": reply}, {"role": "user", "content": "How are you?"}]
    code, out, err = _main(monkeypatch, capsys, "chat", str(chat_bundle), "--max-new-tokens", str(NEW_TOKENS),
                           stdin=b"Hello there\nHow are you?\n/reset\n  Hello there \n\nnot read\n")
    assert code == 0 and out == f"{reply}\n{lm.chat(second, max_new_tokens=NEW_TOKENS)}\n{reply}\n"
    assert "(conversation cleared)" in err and err.count("new tokens, prefill") == 3
    system = [{"role": "system", "content": "Be brief."}, first]
    code, out, _ = _main(monkeypatch, capsys, "chat", str(chat_bundle), "--system", "Be brief.",
                         "--max-new-tokens", str(NEW_TOKENS), stdin=b"Hello there\n")
    assert code == 0 and out == lm.chat(system, max_new_tokens=NEW_TOKENS) + "\n"


def test_cli_chat_drops_old_turns_once_and_refuses_what_cannot_fit(monkeypatch, capsys, chat_bundle, gpt2_bundle):
    lines = "".join(f"tell me about topic number {n}\n" for n in range(8)).encode()
    code, _, err = _main(monkeypatch, capsys, "chat", str(chat_bundle), "--max-new-tokens", str(NEW_TOKENS),
                         stdin=lines)
    assert code == 0 and err.count("oldest turns are dropped") == 1
    _one_line_error(_main(monkeypatch, capsys, "chat", str(chat_bundle), stdin=b"word " * 150 + b"\n"),
                    "the last message does not fit")
    _one_line_error(_main(monkeypatch, capsys, "chat", str(gpt2_bundle), stdin=b"Hello\n"),
                    "has no chat template: use `kninfer generate`")


def test_cli_generate_chat(monkeypatch, capsys, lm, chat_bundle):
    expected = lm.chat([{"role": "user", "content": "Hello there"}], max_new_tokens=NEW_TOKENS) + "\n"
    for stream in ("--stream", "--no-stream"):
        code, out, err = _main(monkeypatch, capsys, "generate", str(chat_bundle), "--chat", "--prompt", "Hello there",
                               "--max-new-tokens", str(NEW_TOKENS), stream)
        assert code == 0 and out == expected and "new tokens" in err
    _one_line_error(_main(monkeypatch, capsys, "generate", str(chat_bundle), "--chat", "--prompt", "a", "--prompt",
                          "b"), "--chat takes one --prompt")


def test_export_carries_the_tokenizers_chat_template(tmp_path, chat_model, gpt2_tokenizer):
    """From a tokenizer object, and from a saved folder: its chat_template.jinja, or tokenizer_config.json's list
    of named templates (the older layout); of several, the "default" one."""
    from kninfer.export import export

    def exported(tokenizer, name: str) -> str | None:
        export(chat_model, tmp_path / name / "model.onnx", tokenizer=tokenizer, verify=False, log=lambda _: None)
        return kninfer.load(tmp_path / name).info.meta["chat_template"]

    hf = _hf(_chat_tokenizer(gpt2_tokenizer), SMOLLM2)
    assert exported(hf, "object") == SMOLLM2
    hf.chat_template = {"default": LLAMA_LIKE, "other": SMOLLM2}
    hf.save_pretrained(tmp_path / "tok")
    assert exported(tmp_path / "tok", "jinja") == LLAMA_LIKE
    (tmp_path / "tok" / "chat_template.jinja").unlink()
    config_path = tmp_path / "tok" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = [{"name": "other", "template": LLAMA_LIKE}, {"name": "default", "template": SMOLLM2}]
    config_path.write_text(json.dumps(config))
    assert exported(tmp_path / "tok", "config") == SMOLLM2


def test_chat_needs_neither_torch_nor_transformers(chat_bundle):
    """`LanguageModel.chat` and `kninfer chat` in a process where importing torch or transformers fails."""
    code = (
        "import sys\n"
        "for name in ('torch', 'transformers', 'optimum', 'onnx'):\n"
        "    sys.modules[name] = None  # any import of them now raises ImportError\n"
        "import kninfer\n"
        f"print(repr(kninfer.load({str(chat_bundle)!r}).chat([{{'role': 'user', 'content': 'Hi'}}], "
        "max_new_tokens=3)))\n"
        "from kninfer.cli import main\n"
        f"sys.argv = ['kninfer', 'chat', {str(chat_bundle)!r}, '--max-new-tokens', '3']\n"
        "main()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, input="Hi\n", timeout=120)
    assert done.returncode == 0, done.stderr
    api_reply, cli_output = done.stdout.split("\n", 1)
    assert cli_output == ast.literal_eval(api_reply) + "\n"
