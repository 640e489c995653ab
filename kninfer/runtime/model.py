"""The public runtime API: `load` a bundle as a LanguageModel or a TextClassifier (numpy and onnxruntime only)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from kninfer.errors import KninferError
from kninfer.runtime.bundle import Bundle, read_bundle, read_tokenizer
from kninfer.runtime.chat import ChatTemplate, Message, chat_template
from kninfer.runtime.classify import Prediction, classify, predictions
from kninfer.runtime.generate import Generation, Sampling, TextStream, decoding, generate, prompt_budget
from kninfer.runtime.perplexity import Perplexity, perplexity
from kninfer.runtime.session import CausalLM, Classifier
from kninfer.runtime.tasks import get_task, read_glue_tsv
from kninfer.runtime.tokenizer import encode

Progress = Callable[[int, int], None]  # called with (done, total) as work advances


def load(path: str | Path, *, threads: int | None = None,
         low_memory: bool = False) -> LanguageModel | TextClassifier:
    """The bundle at `path` (its folder or a .onnx in it) on onnxruntime: a LanguageModel for a causal-lm bundle,
    a TextClassifier for a sequence-classification one. `threads` None uses every core; `low_memory` skips
    onnxruntime's pre-packed weight copies (less memory, slower steps)."""
    info = read_bundle(path)
    tokenizer = read_tokenizer(info)
    if info.task == "causal-lm":
        return LanguageModel(info, tokenizer, CausalLM(info, threads=threads, low_memory=low_memory))
    return TextClassifier(info, tokenizer, Classifier(info, threads=threads, low_memory=low_memory))


@dataclass(frozen=True)
class LanguageModel:
    """A causal-LM bundle: generate or stream continuations, chat (with the bundle's chat template), score text.

    Sampling keywords are those of `Sampling` (max_new_tokens, temperature, top_k, top_p, repetition_penalty,
    seed, stop: a string or several), plus `truncate`: keep the end of a prompt that fills the context. Prompts
    get the special tokens the tokenizer adds (a Llama tokenizer's BOS; none for GPT-2).
    """

    info: Bundle
    tokenizer: Tokenizer = field(repr=False)  # its repr is the whole vocabulary
    session: CausalLM = field(repr=False)

    def generate(self, prompt: str | list[str], *, truncate: bool = False, **sampling: Any) -> str | list[str]:
        """The new text after a prompt, or after each prompt of a list (decoded as one left-padded batch)."""
        texts = self.complete([prompt] if isinstance(prompt, str) else prompt, truncate=truncate, **sampling).texts
        return texts[0] if isinstance(prompt, str) else texts

    def complete(self, prompts: list[str], *, truncate: bool = False, **sampling: Any) -> Generation:
        """What `generate` returns for a list, with the new token ids, token counts and timings."""
        return generate(self.session, self.tokenizer, prompts, _sampling(sampling), truncate)

    def stream(self, prompt: str, *, truncate: bool = False, **sampling: Any) -> TextStream:
        """The new text in pieces as it is decoded, each final (a partial character or the start of a stop string
        is held back); the stream's `result` is the whole Generation once it is exhausted."""
        options = _sampling(sampling)
        return TextStream(decoding(self.session, self.tokenizer, [prompt], options, truncate), options.stop)

    def chat(self, messages: list[Message], **sampling: Any) -> str:
        """The assistant's reply to `messages` ({"role": ..., "content": ...} dicts, oldest first) rendered with the
        bundle's chat template; decoding stops at the bundle's EOS (SmolLM2's <|im_end|>). The oldest turns that do
        not fit the context are left out (`fit_conversation`)."""
        return "".join(self.chat_stream(messages, **sampling))

    def chat_stream(self, messages: list[Message], **sampling: Any) -> TextStream:
        """The reply `chat` gives, in pieces as `stream` hands them out."""
        options = _sampling(sampling)
        prompt = self.chat_template.render(self.fit_conversation(messages, options.max_new_tokens))
        return TextStream(decoding(self.session, self.tokenizer, [prompt], options, special_tokens=False),
                          options.stop)

    def fit_conversation(self, messages: list[Message],
                         max_new_tokens: int = Sampling.max_new_tokens) -> list[Message]:
        """The messages `chat` sends: `messages` less their oldest turns (a leading system message stays) while the
        prompt is longer than a `truncate` cut keeps (room for `max_new_tokens`, at least half the context); an error
        when the last message alone fills the context."""
        context = self.info.context_length
        return self.chat_template.fit(messages, context, prompt_budget(context, max_new_tokens))

    @cached_property
    def chat_template(self) -> ChatTemplate:
        """The bundle's chat template, compiled on first use; an error when the bundle has none."""
        return chat_template(self.info, self.tokenizer)

    def perplexity(self, text: str, *, stride: int | None = None, max_length: int | None = None,
                   progress: Progress | None = None) -> Perplexity:
        """Sliding-window perplexity of `text` as given: windows of `max_length` tokens (default the context) every
        `stride` tokens (default half a window), each token scored once (`kninfer.runtime.perplexity.windows`).
        The whole text is encoded once with the tokenizer's special tokens, as `tokenizer(text)` in eval-lm: a Llama
        BOS comes once, before the text's first token (which it lets be scored), not at each window; GPT-2 adds
        none."""
        return perplexity(self.session, encode(self.tokenizer, text), stride, max_length, progress)


@dataclass(frozen=True)
class GlueResult:
    """A GLUE TSV classified: its task, one prediction per row, and the task's metrics when the file has labels."""

    task: str
    predictions: list[Prediction]
    metrics: dict[str, float] | None


@dataclass(frozen=True)
class TextClassifier:
    """A sequence-classification bundle: label sentences or sentence pairs, score a GLUE TSV."""

    info: Bundle
    tokenizer: Tokenizer = field(repr=False)  # its repr is the whole vocabulary
    session: Classifier = field(repr=False)

    def classify(self, texts: str | list[str], pairs: str | list[str] | None = None, *, batch_size: int = 16,
                 progress: Progress | None = None) -> Prediction | list[Prediction]:
        """The prediction for a text, or for each text of a list; `pairs` gives each its second sentence."""
        single = isinstance(texts, str)
        firsts = [texts] if single else list(texts)
        if not firsts:
            raise KninferError("no text given: expected at least one text to classify")
        if pairs is None:
            inputs = [(text,) for text in firsts]
        else:
            seconds = [pairs] if isinstance(pairs, str) else list(pairs)
            if len(seconds) != len(firsts):
                raise KninferError(f"{len(seconds)} pairs for {len(firsts)} texts: give one pair per text")
            inputs = list(zip(firsts, seconds, strict=True))
        found = predictions(classify(self.session, self.tokenizer, inputs, batch_size, progress), self.info.labels)
        return found[0] if single else found

    def classify_tsv(self, path: str | Path, *, task: str | None = None, batch_size: int = 16,
                     progress: Progress | None = None) -> GlueResult:
        """Classify each row of a GLUE TSV of `task` (default: the bundle's glue_task), as `kninfer classify
        --file` does, and score the predictions when the file has labels."""
        name = task or self.info.glue_task
        if name is None:
            raise KninferError(f"'{self.info.onnx_path}' names no glue_task: pass --task to read '{path}'")
        glue = get_task(name)
        inputs, gold = read_glue_tsv(path, glue)
        if not inputs:
            raise KninferError(f"'{path}' has no rows to classify")
        logits = classify(self.session, self.tokenizer, inputs, batch_size, progress)
        metrics = None if gold is None else glue.metrics(glue.predictions(logits), gold)
        return GlueResult(glue.name, predictions(logits, self.info.labels), metrics)


def _sampling(options: dict[str, Any]) -> Sampling:
    """Sampling from keyword options, `stop` a string or any sequence of them (decoding checks the values)."""
    stop = options.get("stop", ())
    return Sampling(**{**options, "stop": (stop,) if isinstance(stop, str) else tuple(stop)})
