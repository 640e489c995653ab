"""`kninfer serve` against clients no one here wrote: the official `openai` client (completions and chat, plain and
streamed, greedy output equal to `kninfer generate` and `LanguageModel`, usage equal to transformers' token counts)
and raw httpx requests (bad fields, wrong types, huge max_tokens, non-UTF-8 bodies, unknown models, wrong keys);
a client that leaves mid-stream, the queue, the timeout, SIGTERM, the CLI. Servers run in-process on a free port."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
from test_chat import BOS, IM_END, SMOLLM2, _chat_tokenizer, _hf
from test_cli_errors import BLOCKED, _main, _one_line_error
from transformers import GPT2Config, GPT2LMHeadModel

import kninfer
from kninfer.serve import Server, build_server, load_models

KEY = "sk-test-key"
PROMPTS = ["Hello, my name is", "The capital of France", "é 世界 and more"]
NEW_TOKENS = 8
CONVERSATION = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}]
ERROR_FIELDS = {"message", "type", "param", "code"}


@contextmanager
def running(models: dict, **options) -> Iterator[Server]:
    """A server of `models` on a free localhost port, in a thread, until the block ends."""
    server = build_server(models, port=0, log_level="warning", **options)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    start = time.monotonic()
    while not server.started:
        assert thread.is_alive() and time.monotonic() - start < 30, "the server did not start"
        time.sleep(0.01)
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive(), "the server did not stop"


def _client(server: Server, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=30)


def _post(server: Server, path: str, body: dict | bytes, key: str | None = KEY, **kwargs) -> httpx.Response:
    """A raw POST; a dict goes as JSON, bytes as they are (Content-Type: application/json)."""
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server.url}{path}", content=content, headers=headers, timeout=30, **kwargs)


def _error(response: httpx.Response, status: int) -> dict:
    """The OpenAI-shaped error of a response that must have `status`."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == ERROR_FIELDS and isinstance(error["message"], str) and error["type"]
    return error


class Slow:
    """A CausalLM whose every onnxruntime run waits `delay` seconds first and is counted: a long generation."""

    def __init__(self, session, delay: float) -> None:
        self.session, self.delay, self.bundle, self.runs = session, delay, session.bundle, 0

    def prefill(self, ids, mask, capacity=0):
        self.runs += 1
        time.sleep(self.delay)
        return self.session.prefill(ids, mask, capacity)

    def step(self, ids, mask, cache):
        self.runs += 1
        time.sleep(self.delay)
        return self.session.step(ids, mask, cache)


@pytest.fixture(scope="module")
def chat_bundle(tmp_path_factory, gpt2_tokenizer) -> Path:
    """A tiny random GPT-2 with SmolLM2's chat template and EOS (<|im_end|>), as in test_chat.py."""
    from kninfer.export.bundle import export_bundle

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50260, n_positions=128, n_embd=32, n_layer=2, n_head=4, bos_token_id=BOS,
                        eos_token_id=IM_END)
    folder = tmp_path_factory.mktemp("chat")
    export_bundle(GPT2LMHeadModel(config).eval(), folder / "model.onnx", verify=False, chat_template=SMOLLM2,
                  tokenizer_json=_chat_tokenizer(gpt2_tokenizer).to_str())
    return folder


@pytest.fixture(scope="module")
def eos_bundle(tmp_path_factory, chat_bundle) -> tuple[Path, int]:
    """The chat bundle with its EOS made the 4th token of the greedy reply to CONVERSATION, and that position."""
    tokens = kninfer.load(chat_bundle, threads=1).chat_stream(CONVERSATION, max_new_tokens=NEW_TOKENS)
    "".join(tokens)
    ids = tokens.result.token_ids[0]
    folder = tmp_path_factory.mktemp("eos")
    shutil.copytree(chat_bundle, folder, dirs_exist_ok=True)
    meta = json.loads((folder / "kninfer.json").read_text())
    meta["models"]["model.onnx"]["eos_token_id"] = ids[3]
    (folder / "kninfer.json").write_text(json.dumps(meta))
    return folder, ids.index(ids[3])


@pytest.fixture(scope="module")
def models(gpt2_bundle, chat_bundle, eos_bundle, sst2_bundle) -> dict:
    return load_models([f"gpt2={gpt2_bundle}", f"chat={chat_bundle}", f"chat-eos={eos_bundle[0]}",
                        f"sst2={sst2_bundle}"], threads=1)


@pytest.fixture(scope="module")
def server(models) -> Iterator[Server]:
    with running(models, max_concurrency=2, max_queue=4, api_key=KEY) as server:
        yield server


def test_completions_equal_generate_and_count_tokens_as_transformers(server, models, gpt2_tokenizer, gpt2_bundle,
                                                                      monkeypatch, capsys):
    client, lm, texts = _client(server), models["gpt2"], {}
    for prompt in PROMPTS:
        expected = lm.generate(prompt, max_new_tokens=NEW_TOKENS)
        tokens = len(lm.complete([prompt], max_new_tokens=NEW_TOKENS).token_ids[0])
        reason = "length" if tokens == NEW_TOKENS else "stop"
        prompt_tokens = len(gpt2_tokenizer(prompt)["input_ids"])
        done = client.completions.create(model="gpt2", prompt=prompt, max_tokens=NEW_TOKENS, temperature=0)
        assert done.object == "text_completion" and done.model == "gpt2" and len(done.choices) == 1
        assert done.choices[0].text == expected and done.choices[0].finish_reason == reason
        assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (prompt_tokens, tokens)
        assert done.usage.total_tokens == prompt_tokens + tokens
        texts[prompt] = done.choices[0].text

        chunks = list(client.completions.create(model="gpt2", prompt=prompt, max_tokens=NEW_TOKENS, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
        assert len({c.id for c in chunks}) == 1 and all(c.object == "text_completion" for c in chunks)
        assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 2) + [reason]
        assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == prompt_tokens
        assert chunks[-2].usage.completion_tokens == chunks[-1].usage.completion_tokens == tokens

    code, out, _ = _main(monkeypatch, capsys, "generate", str(gpt2_bundle), "--prompt", PROMPTS[2],
                         "--max-new-tokens", str(NEW_TOKENS))
    assert code == 0 and out == texts[PROMPTS[2]] + "\n"


def test_a_list_of_prompts_gives_a_choice_each(server, models):
    expected = [models["gpt2"].generate(prompt, max_new_tokens=4) for prompt in PROMPTS[:2]]  # each on its own
    done = _client(server).completions.create(model="gpt2", prompt=PROMPTS[:2], max_tokens=4, temperature=0)
    assert [c.text for c in done.choices] == expected and [c.index for c in done.choices] == [0, 1]


def test_stop_strings_and_sampling_options_reach_the_runtime(server, models):
    client, lm = _client(server), models["gpt2"]
    greedy = lm.generate(PROMPTS[0], max_new_tokens=NEW_TOKENS)
    stop = greedy[len(greedy) // 2:len(greedy) // 2 + 2]
    for stream in (False, True):
        done = client.completions.create(model="gpt2", prompt=PROMPTS[0], max_tokens=NEW_TOKENS, temperature=0,
                                         stop=[stop, "never seen"], stream=stream)
        choices = [c.choices[0] for c in done] if stream else done.choices
        assert "".join(c.text for c in choices) == greedy[:greedy.index(stop)]
        assert choices[-1].finish_reason == "stop"
    options = {"temperature": 0.9, "top_p": 0.8, "seed": 7}
    sampled = lm.generate(PROMPTS[1], max_new_tokens=NEW_TOKENS, **options)
    for _ in range(2):
        done = client.completions.create(model="gpt2", prompt=PROMPTS[1], max_tokens=NEW_TOKENS, **options,
                                         extra_body={"top_k": 0, "repetition_penalty": 1.0})
        assert done.choices[0].text == sampled
    penalised = lm.generate(PROMPTS[1], max_new_tokens=NEW_TOKENS, top_k=5, repetition_penalty=1.5, seed=3,
                            temperature=1.0)
    done = client.completions.create(model="gpt2", prompt=PROMPTS[1], max_tokens=NEW_TOKENS, seed=3,
                                     extra_body={"top_k": 5, "repetition_penalty": 1.5})
    assert done.choices[0].text == penalised  # OpenAI's default temperature, 1


def test_chat_equals_generate_chat_and_counts_tokens_as_apply_chat_template(server, models, chat_bundle, gpt2_tokenizer,
                                                                           monkeypatch, capsys):
    client, lm = _client(server), models["chat"]
    hf = _hf(_chat_tokenizer(gpt2_tokenizer), SMOLLM2)
    prompt_tokens = len(hf.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True))
    expected = lm.chat(CONVERSATION, max_new_tokens=NEW_TOKENS)
    done = client.chat.completions.create(model="chat", messages=CONVERSATION, max_tokens=NEW_TOKENS, temperature=0)
    assert done.object == "chat.completion" and done.choices[0].message.role == "assistant"
    assert done.choices[0].message.content == expected and done.choices[0].finish_reason == "length"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (prompt_tokens, NEW_TOKENS)
    chunks = list(client.chat.completions.create(model="chat", messages=CONVERSATION, max_completion_tokens=NEW_TOKENS,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage.prompt_tokens == prompt_tokens

    user = [{"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}]
    done = client.chat.completions.create(model="chat", messages=user, max_tokens=NEW_TOKENS, temperature=0)
    code, out, _ = _main(monkeypatch, capsys, "generate", str(chat_bundle), "--chat", "--prompt", "Hello there",
                         "--max-new-tokens", str(NEW_TOKENS))
    assert code == 0 and out == done.choices[0].message.content + "\n"


def test_chat_stops_at_eos_with_finish_reason_stop(server, eos_bundle):
    _, position = eos_bundle
    reply = kninfer.load(eos_bundle[0], threads=1).chat(CONVERSATION, max_new_tokens=NEW_TOKENS)
    done = _client(server).chat.completions.create(model="chat-eos", messages=CONVERSATION, temperature=0)
    assert done.choices[0].message.content == reply and done.choices[0].finish_reason == "stop"
    assert done.usage.completion_tokens == position  # max_tokens unset: the rest of the context, not reached


def test_models_health_and_classify(server, models, sst2_classifier, gpt2_tokenizer):
    client = _client(server)
    assert [m.id for m in client.models.list()] == ["gpt2", "chat", "chat-eos", "sst2"]
    health = httpx.get(f"{server.url}/health")  # no key needed
    assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["running"] == 0

    texts = ["a fine, moving film", "dull and far too long"]
    response = _post(server, "/v1/classify", {"model": "sst2", "input": texts})
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    with torch.no_grad():
        probs = [sst2_classifier(torch.tensor([gpt2_tokenizer(t)["input_ids"]])).logits[0].softmax(-1) for t in texts]
    assert [d["label"] for d in data] == [sst2_classifier.config.id2label[int(p.argmax())] for p in probs]
    assert [d["score"] for d in data] == pytest.approx([p.max().item() for p in probs], abs=1e-4)
    tokens = sum(len(gpt2_tokenizer(t)["input_ids"]) for t in texts)
    assert response.json()["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    pair = _post(server, "/v1/classify", {"model": "sst2", "input": "a", "pairs": "b"}).json()["data"]
    assert pair[0]["label"] == models["sst2"].classify("a", "b").label
    assert _error(_post(server, "/v1/classify", {"model": "sst2", "input": ["a"], "pairs": ["b", "c"]}),
                  400)["param"] == "pairs"
    assert _error(_post(server, "/v1/classify", {"model": "gpt2", "input": "a"}), 400)["param"] == "model"
    assert _error(_post(server, "/v1/completions", {"model": "sst2", "prompt": "a"}), 400)["param"] == "model"


@pytest.mark.parametrize(("body", "param", "says"), [
    ({"prompt": "a"}, "model", "Field required"),
    ({"model": "gpt2"}, "prompt", "Field required"),
    ({"model": "gpt2", "prompt": 5}, "prompt", "valid string"),
    ({"model": "gpt2", "prompt": "a", "temperature": "hot"}, "temperature", "valid number"),
    ({"model": "gpt2", "prompt": "a", "max_tokens": "16"}, "max_tokens", "valid integer"),
    ({"model": "gpt2", "prompt": "a", "max_tokens": 1.5}, "max_tokens", "valid integer"),
    ({"model": "gpt2", "prompt": "a", "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"model": "gpt2", "prompt": "a", "stream": "yes"}, "stream", "valid boolean"),
    ({"model": "gpt2", "prompt": "a", "temperature": 3}, "temperature", "less than or equal to 2"),
    ({"model": "gpt2", "prompt": "a", "top_p": 0}, "top_p", "greater than 0"),
    ({"model": "gpt2", "prompt": "a", "seed": -1}, "seed", "greater than or equal to 0"),
    ({"model": "gpt2", "prompt": "a", "stop": ["x", ""]}, "stop.1", "at least 1 character"),
    ({"model": "gpt2", "prompt": "a", "n": 2}, "n", "not supported"),
    ({"model": "gpt2", "prompt": "a", "logprobs": 3}, "logprobs", "not supported"),
    ({"model": "gpt2", "prompt": ""}, "prompt", "the prompt is empty"),
    ({"model": "chat", "messages": []}, "messages", "at least 1 item"),
    ({"model": "chat", "messages": [{"role": "user", "content": 5}]}, "messages.0.content", "valid string"),
    ({"model": "chat", "messages": [{"role": "robot", "content": "a"}]}, "messages.0.role", "'system', 'user'"),
    ({"model": "gpt2", "messages": [{"role": "user", "content": "a"}]}, "model", "has no chat template"),
], ids=lambda value: "" if isinstance(value, str) else json.dumps(value)[:40])
def test_bad_fields_are_400_naming_the_field(server, body, param, says):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    error = _error(_post(server, path, body), 400)
    assert error["param"] == param and says in error["message"] and error["type"] == "invalid_request_error"


def test_prompts_past_the_context_and_huge_max_tokens_are_400_with_the_token_counts(server, gpt2_tokenizer):
    long = "word " * 150
    tokens = len(gpt2_tokenizer(long)["input_ids"])
    assert tokens > 128
    error = _error(_post(server, "/v1/completions", {"model": "gpt2", "prompt": long}), 400)
    assert f"context length is 128 tokens, but the prompt has {tokens} tokens" in error["message"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    short = len(gpt2_tokenizer(PROMPTS[0])["input_ids"])
    for huge in (10**20, 128):
        error = _error(_post(server, "/v1/completions", {"model": "gpt2", "prompt": PROMPTS[0], "max_tokens": huge}),
                       400)
        assert f"{short + huge} were requested ({short} in the prompt, {huge} for the completion)" in error["message"]
    fits = _client(server).completions.create(model="gpt2", prompt=PROMPTS[0], max_tokens=128 - short, temperature=0)
    assert fits.usage.completion_tokens <= 128 - short
    with pytest.raises(openai.BadRequestError, match="the prompt has"):  # the official client reads the shape
        _client(server).chat.completions.create(model="chat", messages=[{"role": "user", "content": long}])


def test_bodies_that_are_not_json_or_not_utf8_keys_models_and_paths(server):
    for body in (b'{"model": "gpt2", "prompt": "\xff\xfe caf\xe9"}', b"\xff\xfe\x00", b"{not json", b"[1, 2]"):
        assert _error(_post(server, "/v1/completions", body), 400)["type"] == "invalid_request_error"
    error = _error(_post(server, "/v1/completions", {"model": "gpt-4", "prompt": "a"}), 404)
    assert error["code"] == "model_not_found" and "gpt2, chat, chat-eos, sst2" in error["message"]
    with pytest.raises(openai.NotFoundError):
        _client(server).completions.create(model="gpt-4", prompt="a")
    for key in ("wrong", None, KEY + "x", KEY[:-1]):
        assert _error(_post(server, "/v1/completions", {"model": "gpt2", "prompt": "a"}, key=key),
                      401)["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        _client(server, key="wrong").models.list()
    assert _error(httpx.get(f"{server.url}/v1/nowhere"), 404)
    assert _error(httpx.get(f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"}), 405)
    assert _client(server).completions.create(model="gpt2", prompt="a", max_tokens=1).usage.completion_tokens == 1


@pytest.fixture
def slow(models) -> dict:
    """The tiny GPT-2 with 20 ms per onnxruntime run (128 tokens: about 2.6 s)."""
    lm = models["gpt2"]
    return {"slow": dataclasses.replace(lm, session=Slow(lm.session, 0.02))}


def _health(server: Server) -> dict:
    return httpx.get(f"{server.url}/health").json()


def test_a_client_that_leaves_mid_stream_frees_its_slot_at_once(slow):
    with running(slow, max_concurrency=1, max_queue=0) as server:
        client = _client(server)
        stream = client.completions.create(model="slow", prompt=PROMPTS[0], max_tokens=100, stream=True)
        pieces = [next(iter(stream)) for _ in range(3)]
        assert len(pieces) == 3 and _health(server)["running"] == 1
        left = time.monotonic()
        stream.close()
        while _health(server)["running"]:
            assert time.monotonic() - left < 1.5, "the slot is still held after the client left"
            time.sleep(0.01)
        runs = slow["slow"].session.runs
        time.sleep(0.2)
        assert slow["slow"].session.runs == runs < 50  # decoding stopped too, long before its 100 tokens
        done = client.completions.create(model="slow", prompt=PROMPTS[0], max_tokens=2)  # no 429: the slot is free
        assert done.usage.completion_tokens == 2

        runs = slow["slow"].session.runs
        with pytest.raises(httpx.ReadTimeout):  # a plain request whose client gives up: decoding stops as well
            httpx.post(f"{server.url}/v1/completions", json={"model": "slow", "prompt": "a", "max_tokens": 100},
                       timeout=0.3)
        left = time.monotonic()
        while _health(server)["running"]:
            assert time.monotonic() - left < 1.5, "the slot is still held after the client left"
            time.sleep(0.01)
        assert slow["slow"].session.runs - runs < 50


def test_the_queue_is_bounded_and_past_it_requests_get_429(slow, models):
    with running(slow, max_concurrency=1, max_queue=1) as server:
        client, results = _client(server), {}

        def complete(name: str) -> None:
            results[name] = client.completions.create(model="slow", prompt=PROMPTS[0], max_tokens=40, temperature=0)

        threads = [threading.Thread(target=complete, args=(name,)) for name in ("first", "second")]
        for thread in threads:
            thread.start()
        start = time.monotonic()  # each takes 40 steps of 20 ms: the second waits for the first
        while (_health(server)["running"], _health(server)["waiting"]) != (1, 1):
            assert time.monotonic() - start < 0.8, "one request should run and one wait"
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as refused:
            client.completions.create(model="slow", prompt=PROMPTS[0], max_tokens=40)
        assert refused.value.status_code == 429 and refused.value.body["code"] == "queue_full"
        for thread in threads:
            thread.join(30)
        expected = models["gpt2"].generate(PROMPTS[0], max_new_tokens=40)
        assert [results[name].choices[0].text for name in ("first", "second")] == [expected, expected]


def test_the_request_timeout_ends_a_response_and_a_stream(slow):
    with running(slow, timeout=1.0) as server:
        start = time.monotonic()
        error = _error(_post(server, "/v1/completions", {"model": "slow", "prompt": "a", "max_tokens": 100}, key=None),
                       504)
        assert error["code"] == "timeout" and 1.0 <= time.monotonic() - start < 2.5
        stream = _client(server).completions.create(model="slow", prompt="a", max_tokens=100, stream=True)
        with pytest.raises(openai.APIError, match="longer than the server's --timeout"):
            list(stream)
        assert _health(server)["running"] == 0


def test_sigterm_lets_short_streams_finish_and_cuts_long_ones_after_the_grace_time(slow, models):
    server = build_server(slow, port=0, log_level="warning", max_concurrency=2, grace=0.5)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    client, results = _client(server), {}

    def stream(name: str, tokens: int) -> None:
        try:
            chunks = list(client.completions.create(model="slow", prompt=PROMPTS[0], max_tokens=tokens,
                                                    temperature=0, stream=True))
            results[name] = chunks
        except openai.APIError as error:
            results[name] = error

    threads = [threading.Thread(target=stream, args=("short", 10)), threading.Thread(target=stream, args=("long", 100))]
    for t in threads:
        t.start()
    time.sleep(0.1)
    start = time.monotonic()
    server.handle_exit(signal.SIGTERM, None)
    for t in threads:
        t.join(10)
    thread.join(10)
    assert not thread.is_alive() and time.monotonic() - start < 3
    assert "".join(c.choices[0].text for c in results["short"]) == models["gpt2"].generate(PROMPTS[0],
                                                                                          max_new_tokens=10)
    assert isinstance(results["long"], openai.APIError) and "shutting down" in str(results["long"])


def test_a_draining_server_refuses_new_requests_with_503(models):
    with running({"gpt2": models["gpt2"]}) as server:
        server.service.slots.drain(5.0)  # what SIGTERM starts, without closing the listener
        health = httpx.get(f"{server.url}/health")
        assert health.status_code == 503 and health.json()["status"] == "shutting_down"
        error = _error(_post(server, "/v1/completions", {"model": "gpt2", "prompt": "a"}, key=None), 503)
        assert error["code"] == "shutting_down"


def test_cli_serve_prints_the_url_and_models_takes_the_key_from_the_environment_and_stops_on_sigterm(
        gpt2_bundle, sst2_bundle, models):
    """In a process where torch, transformers and the other training packages cannot be imported."""
    command = [sys.executable, "-c", BLOCKED, "serve", str(gpt2_bundle), f"clf={sst2_bundle}", "--port", "0",
               "--threads", "1", "--log-level", "warning"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "KNINFER_API_KEY": KEY})
    watchdog = threading.Timer(60, process.kill)
    watchdog.start()
    try:
        first = process.stdout.readline()
        assert first.startswith("kninfer serve: http://127.0.0.1:")
        assert first.rstrip().endswith("/v1 (Ctrl-C or SIGTERM stops it, API key required)")
        lines = [process.stdout.readline(), process.stdout.readline()]
        assert lines[0].startswith(f"  {gpt2_bundle.name}: causal-lm, context 128") and lines[1].startswith(
            "  clf: sequence-classification")
        client = openai.OpenAI(base_url=first.split()[2], api_key=KEY, max_retries=0)
        assert httpx.get(f"{first.split()[2]}/models").status_code == 401
        done = client.completions.create(model=gpt2_bundle.name, prompt=PROMPTS[0], max_tokens=4, temperature=0)
        assert done.choices[0].text == models["gpt2"].generate(PROMPTS[0], max_new_tokens=4)
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0, process.stderr.read()
    finally:
        watchdog.cancel()
        process.kill()


def test_cli_serve_refusals_are_one_line(monkeypatch, capsys, gpt2_bundle, tmp_path):
    _one_line_error(_main(monkeypatch, capsys, "serve", f"a={gpt2_bundle}", f"a={gpt2_bundle}"),
                    "two bundles are named 'a': name them apart with NAME=PATH")
    _one_line_error(_main(monkeypatch, capsys, "serve", str(gpt2_bundle), "--log-level", "loud"), "--log-level")
    _one_line_error(_main(monkeypatch, capsys, "serve", str(tmp_path)), "kninfer.json")
    code = ("import sys\nsys.modules['fastapi'] = None\nfrom kninfer.cli import main\n"
            f"sys.argv = ['kninfer', 'serve', {str(gpt2_bundle)!r}]\nmain()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr == ("error: 'kninfer serve' needs the serve extra: "
                                                    "pip install 'kninfer[serve]'\n")


def test_the_readme_client_example_runs_as_written(server, models, capsys):
    """The README's `openai` example against a server (its URL, key and model name swapped for this one's)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Serving \(OpenAI-compatible\)\n(.*?)(?=^## |\Z)", readme, flags=re.M | re.S)
    assert section, "README.md has no section '## Serving (OpenAI-compatible)'"
    (code,) = re.findall(r"^```python\n(.*?)^```$", section.group(1), flags=re.M | re.S)
    assert code.count("\n") <= 5
    for old, new in (("http://127.0.0.1:8000", server.url), ('api_key="unused"', f"api_key={KEY!r}"),
                     ('model="student"', 'model="gpt2"')):
        assert code.count(old) == 1, old
        code = code.replace(old, new)
    exec(compile(code, "README.md (serving)", "exec"), {"__name__": "__readme__"})
    prompt = re.search(r'prompt="([^"]+)"', code).group(1)
    assert capsys.readouterr().out.startswith(models["gpt2"].generate(prompt, max_new_tokens=20) + " ")


def test_the_load_script_reports_what_its_requests_measured(gpt2_bundle, models, tmp_path):
    """bench/serve_load.py on the tiny GPT-2: no errors below the queue limit, every request's tokens as the
    runtime's, and the summary recomputed from the per-request figures it writes."""
    script = Path(__file__).resolve().parents[1] / "bench" / "serve_load.py"
    done = subprocess.run([sys.executable, str(script), "--bundle", str(gpt2_bundle), "--clients", "2", "--requests",
                           "6", "--max-tokens", "4", "--threads", "1", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    (path,) = tmp_path.glob("serve-load-*.json")
    assert path.with_suffix(".md").read_text() == done.stdout
    results = json.loads(path.read_text())
    summary, requests = results["summary"], results["requests"]
    assert summary["requests"] == summary["ok"] == len(requests) == 6 and summary["errors"] == 0
    lm = models["gpt2"]
    assert sorted(r["number"] for r in requests) == list(range(6))
    for request in requests:
        assert request["tokens"] == len(lm.complete([request["prompt"]], max_new_tokens=4).token_ids[0])
    assert summary["requests_per_s"] == pytest.approx(6 / summary["wall_s"])
    assert summary["tokens_per_s"] == pytest.approx(sum(r["tokens"] for r in requests) / summary["wall_s"])
    assert summary["ttft_ms"]["p50"] == pytest.approx(float(np.median([r["ttft_ms"] for r in requests])))
    assert all(r["ttft_ms"] <= r["latency_s"] * 1e3 for r in requests)
    assert results["server_rss_bytes"]["peak"] >= results["server_rss_bytes"]["start"] > 0
