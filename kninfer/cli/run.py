"""`kninfer generate`, `chat`, `classify`, `eval`: run an exported bundle on onnxruntime, without torch."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from kninfer.cli import MAX_SEED, check_output_file, write_output
from kninfer.errors import KninferError

if TYPE_CHECKING:
    from kninfer.runtime import LanguageModel, TextClassifier
    from kninfer.runtime.classify import Prediction
    from kninfer.runtime.generate import Generation, TextStream

BundleArg = Annotated[Path, typer.Argument(help="The bundle: its directory or its .onnx file (kninfer.json beside).")]
ThreadsOption = Annotated[int | None, typer.Option(help="onnxruntime intra-op threads (default: all cores).", min=1)]
LowMemoryOption = Annotated[bool, typer.Option(help="Skip onnxruntime's pre-packed weight copies: less memory "
                                                    "(about the fp32 MatMul weights' size less), slower steps; "
                                                    "no effect on --int8/--int4 graphs, where it would cost "
                                                    "memory.")]
# The sampling options of `generate` and `chat` (kninfer.runtime.generate.Sampling's fields)
MaxNewTokensOption = Annotated[int, typer.Option(help="Most tokens to add to each prompt (each reply).")]
TemperatureOption = Annotated[float, typer.Option(help="0 is greedy decoding; above 0 samples (1 = model's own).")]
TopKOption = Annotated[int, typer.Option(help="Sample among the k most likely tokens only (0 = all).")]
TopPOption = Annotated[float, typer.Option(help="Sample among the likeliest tokens holding this mass (1 = all).")]
RepetitionPenaltyOption = Annotated[float, typer.Option(help="Above 1 discourages tokens already seen (1 = off).")]
SeedOption = Annotated[int | None, typer.Option(help="Random seed: the same seed gives the same sample.", min=0,
                                                max=MAX_SEED)]
StopOption = Annotated[list[str] | None, typer.Option(help="Stop at this text (not printed); repeatable.")]
stderr = Console(stderr=True)


def generate(
    bundle: BundleArg,
    prompt: Annotated[list[str], typer.Option(help="Text to continue; '-' reads stdin; repeat for a batch.")],
    max_new_tokens: MaxNewTokensOption = 64,
    temperature: TemperatureOption = 0.0,
    top_k: TopKOption = 0,
    top_p: TopPOption = 1.0,
    repetition_penalty: RepetitionPenaltyOption = 1.0,
    seed: SeedOption = None,
    stop: StopOption = None,
    stream: Annotated[bool, typer.Option(help="Print tokens as they come (single prompt only).")] = True,
    chat: Annotated[bool, typer.Option(help="Send the prompt as a user message through the bundle's chat "
                                            "template and print the assistant's reply (one --prompt).")] = False,
    threads: ThreadsOption = None,
    low_memory: LowMemoryOption = False,
    truncate: Annotated[str, typer.Option(help="'left' drops the start of a prompt that fills the context; "
                                               "'none': such a prompt is an error.")] = "none",
) -> None:
    """Continue a prompt (or a batch of prompts) with a causal-LM bundle, or with --chat answer it as a chat model
    (see `kninfer chat`); a timing summary goes to stderr."""
    if truncate not in ("none", "left"):
        raise KninferError(f"--truncate is {truncate!r}: expected 'none' or 'left'")
    if chat and (len(prompt) > 1 or truncate != "none"):
        raise KninferError("--chat takes one --prompt (the user message) and no --truncate")
    sampling = _sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop)
    prompts = [_stdin_text() if p == "-" else _argv_text(p, f"--prompt {n}") for n, p in enumerate(prompt, 1)]
    lm = _load(bundle, "causal-lm", "text generation", threads, low_memory)
    if chat or (stream and len(prompts) == 1):
        pieces = (lm.chat_stream([{"role": "user", "content": prompts[0]}], **sampling) if chat
                  else lm.stream(prompts[0], truncate=truncate == "left", **sampling))
        result = _print_reply(pieces, stream)
    else:
        result = lm.complete(prompts, truncate=truncate == "left", **sampling)
        for number, text in enumerate(result.texts, 1):
            _write(f"[{number}] {text}\n" if len(prompts) > 1 else f"{text}\n")
    print(result.summary(), file=sys.stderr)


def chat(
    bundle: BundleArg,
    system: Annotated[str | None, typer.Option(help="A system message to open the conversation with (default: "
                                                     "the chat template's own, if it has one).")] = None,
    max_new_tokens: MaxNewTokensOption = 256,
    temperature: TemperatureOption = 0.0,
    top_k: TopKOption = 0,
    top_p: TopPOption = 1.0,
    repetition_penalty: RepetitionPenaltyOption = 1.0,
    seed: SeedOption = None,
    stop: StopOption = None,
    threads: ThreadsOption = None,
    low_memory: LowMemoryOption = False,
) -> None:
    """Talk with a chat bundle (one with a chat template, e.g. SmolLM2-Instruct): each line read is a user message,
    the reply streams back. The conversation is kept; when it outgrows the context its oldest turns are dropped
    (the system message stays). '/reset' starts it again; an empty line or end of input (Ctrl-D) ends it. Timing
    lines go to stderr."""
    sampling = _sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop)
    opening = [{"role": "system", "content": _argv_text(system, "--system")}] if system is not None else []
    lm = _load(bundle, "causal-lm", "chat", threads, low_memory)
    lm.chat_template  # noqa: B018 -- refuses a bundle without one before the first line is read
    interactive = sys.stdin.isatty()
    if interactive:
        with suppress(ImportError):  # line editing for input(); not on every platform
            import readline  # noqa: F401
    history: list[dict[str, str]] = []
    dropped = False
    try:
        while line := _read_line("> " if interactive else ""):
            if line == "/reset":
                history = []
                stderr.print("(conversation cleared)")
                continue
            messages = lm.fit_conversation([*opening, *history, {"role": "user", "content": line}], max_new_tokens)
            if len(messages) < len(opening) + len(history) + 1 and not dropped:
                stderr.print("(the conversation outgrew the model's context: its oldest turns are dropped)")
                dropped = True
            result = _print_reply(lm.chat_stream(messages, **sampling), stream=True)
            history = [*messages[len(opening):], {"role": "assistant", "content": result.texts[0]}]
            print(result.summary(), file=sys.stderr)
    except KeyboardInterrupt:  # Ctrl-C ends the conversation, as Ctrl-D does, without a traceback
        _write("\n")


def classify(
    bundle: BundleArg,
    text: Annotated[list[str] | None, typer.Option(help="A sentence to classify; repeatable.")] = None,
    pair: Annotated[list[str] | None, typer.Option(help="The second sentence of each --text (pair tasks).")] = None,
    file: Annotated[Path | None, typer.Option(help="A GLUE TSV (dev/test layout) to classify, not --text.")] = None,
    out: Annotated[Path | None, typer.Option(help="Write 'index<TAB>prediction' rows for --file here (default "
                                                  "for an unlabelled file: stdout).")] = None,
    task: Annotated[str | None, typer.Option(help="GLUE task of --file (default: the bundle's glue_task).")] = None,
    batch_size: Annotated[int, typer.Option(help="Sequences per onnxruntime call.", min=1)] = 16,
    threads: ThreadsOption = None,
    low_memory: LowMemoryOption = False,
) -> None:
    """Classify sentences or pairs with a sequence-classification bundle; score a labelled TSV."""
    if (file is None) == (not text):
        raise KninferError("give either --text (with --pair for pairs) or --file, not both and not neither")
    if out is not None:
        check_output_file(out)
    texts = [_argv_text(t, f"--text {n}") for n, t in enumerate(text or [], 1)]
    pairs = [_argv_text(t, f"--pair {n}") for n, t in enumerate(pair, 1)] if pair else None
    model = _load(bundle, "sequence-classification", "classification", threads, low_memory)
    with _progress("classifying") as progress:
        if file is None:
            predictions = model.classify(texts, pairs, batch_size=batch_size, progress=progress)
        else:
            result = model.classify_tsv(file, task=task, batch_size=batch_size, progress=progress)
    if file is None:
        for prediction in predictions:
            print(_shown(prediction))
        return
    rows = "index\tprediction\n" + "".join(f"{i}\t{_shown(p)}\n" for i, p in enumerate(result.predictions))
    if out is not None:
        write_output(out, rows)
        stderr.print(f"wrote {out}")
    elif result.metrics is None:
        _write(rows)
    if result.metrics is not None:
        shown = ", ".join(f"{name} {value:.4f}" for name, value in result.metrics.items())
        print(f"{result.task} {file.name}: {shown} ({len(result.predictions)} rows)")


def eval_(
    bundle: BundleArg,
    text_file: Annotated[Path, typer.Option(help="UTF-8 text (e.g. wiki.test.raw); lines joined by blank lines, "
                                                 "as the HF recipe and eval-lm do.")],
    stride: Annotated[int | None, typer.Option(help="Tokens between window starts (default: context / 2).")] = None,
    max_length: Annotated[int | None, typer.Option(help="Window length in tokens (default: the context).")] = None,
    threads: ThreadsOption = None,
    low_memory: LowMemoryOption = False,
) -> None:
    """Sliding-window perplexity of a causal-LM bundle on a text file."""
    from kninfer.runtime.perplexity import lm_text

    try:
        text = text_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise KninferError(f"cannot read '{text_file}' as UTF-8 text: {error}") from None
    lm = _load(bundle, "causal-lm", "perplexity", threads, low_memory)
    with _progress("scoring") as progress:
        result = lm.perplexity(lm_text(text), stride=stride, max_length=max_length, progress=progress)
    print(f"perplexity {result.perplexity:.4f} (mean NLL {result.nll:.5f} nats over {result.tokens} tokens of "
          f"{text_file.name})")


def _load(bundle: Path, task: str, purpose: str, threads: int | None,
          low_memory: bool) -> LanguageModel | TextClassifier:
    """`kninfer.load` of the bundle, refused unless it is a `task` bundle."""
    import kninfer

    model = kninfer.load(bundle, threads=threads, low_memory=low_memory)
    if model.info.task != task:
        raise KninferError(f"'{bundle}' is a {model.info.task} bundle: {purpose} needs a {task} bundle")
    return model


@contextmanager
def _progress(description: str) -> Iterator[Callable[[int, int], None]]:
    """A transient progress bar on stderr, and the (done, total) callback that moves it."""
    from rich.progress import Progress

    with Progress(console=stderr, transient=True) as progress:
        bar = progress.add_task(description, total=None)
        yield lambda done, total: progress.update(bar, completed=done, total=total)


def _shown(prediction: Prediction) -> str:
    """A prediction as printed: its label, or a regression value to 4 decimals."""
    return prediction.label if prediction.label is not None else f"{prediction.score:.4f}"


def _sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float, repetition_penalty: float,
              seed: int | None, stop: list[str] | None) -> dict[str, Any]:
    """The sampling options as `LanguageModel`'s keywords, checked before the bundle loads."""
    from kninfer.runtime.generate import Sampling

    sampling = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p,
                "repetition_penalty": repetition_penalty, "seed": seed, "stop": tuple(stop or ())}
    Sampling(**sampling).check()
    return sampling


def _print_reply(pieces: TextStream, stream: bool) -> Generation:
    """Print a TextStream's text and a newline, piece by piece with `stream`; its Generation."""
    if stream:
        for piece in pieces:
            _write(piece)
        _write("\n")
    else:
        _write("".join(pieces) + "\n")
    return pieces.result


def _read_line(prompt: str) -> str:
    """The next line of stdin, stripped; "" at its end."""
    try:
        return _argv_text(input(prompt), "the input line").strip()
    except EOFError:
        return ""
    except UnicodeDecodeError as error:
        raise KninferError(f"stdin is not UTF-8 text ({error.reason})") from None


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _stdin_text() -> str:
    """All of stdin, which must be UTF-8."""
    try:
        return sys.stdin.buffer.read().decode("utf-8")
    except UnicodeDecodeError as error:
        raise KninferError(f"stdin is not UTF-8 text ({error.reason} at byte {error.start})") from None


def _argv_text(text: str, option: str) -> str:
    """`text` from the command line, which must be UTF-8: Python hands other bytes over as lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise KninferError(f"{option} is not UTF-8 text") from None
    return text


eval_.__name__ = "eval"  # the command's name (typer reads __name__); `eval` itself would shadow the builtin
COMMANDS = [generate, chat, classify, eval_]
