"""`kninfer generate`, `kninfer classify`, `kninfer eval`: run an exported bundle on onnxruntime, without torch."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from kninfer.cli import MAX_SEED, check_output_file, write_output
from kninfer.errors import KninferError

BundleArg = Annotated[Path, typer.Argument(help="The bundle: its directory or its .onnx file (kninfer.json beside).")]
ThreadsOption = Annotated[int | None, typer.Option(help="onnxruntime intra-op threads (default: all cores).", min=1)]
LowMemoryOption = Annotated[bool, typer.Option(help="Skip onnxruntime's pre-packed weight copies: less memory "
                                                    "(about the fp32 MatMul weights' size less), slower steps.")]
stderr = Console(stderr=True)


def generate(
    bundle: BundleArg,
    prompt: Annotated[list[str], typer.Option(help="Text to continue; '-' reads stdin; repeat for a batch.")],
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens to add to each prompt.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 is greedy decoding; above 0 samples (1 = model's own).")] = 0.0,
    top_k: Annotated[int, typer.Option(help="Sample among the k most likely tokens only (0 = all).")] = 0,
    top_p: Annotated[float, typer.Option(help="Sample among the likeliest tokens holding this mass (1 = all).")] = 1.0,
    repetition_penalty: Annotated[float, typer.Option(help="Above 1 discourages tokens already seen (1 = off).")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Random seed: the same seed gives the same sample.", min=0,
                                             max=MAX_SEED)] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop at this text (not printed); repeatable.")] = None,
    stream: Annotated[bool, typer.Option(help="Print tokens as they come (single prompt only).")] = True,
    threads: ThreadsOption = None,
    low_memory: LowMemoryOption = False,
    truncate: Annotated[str, typer.Option(help="'left' drops the start of a prompt that fills the context; "
                                               "'none': such a prompt is an error.")] = "none",
) -> None:
    """Continue a prompt (or a batch of prompts) with a causal-LM bundle; a timing summary goes to stderr."""
    from kninfer.runtime.bundle import read_bundle
    from kninfer.runtime.generate import Sampling
    from kninfer.runtime.generate import generate as run_generation
    from kninfer.runtime.session import CausalLM
    from kninfer.runtime.tokenizer import load_tokenizer

    if truncate not in ("none", "left"):
        raise KninferError(f"--truncate is {truncate!r}: expected 'none' or 'left'")
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        repetition_penalty=repetition_penalty, seed=seed, stop=tuple(stop or ()))
    sampling.check()
    prompts = [_stdin_text() if p == "-" else _argv_text(p, f"--prompt {n}") for n, p in enumerate(prompt, 1)]
    info = read_bundle(bundle)
    tokenizer = load_tokenizer(info.tokenizer_path)
    model = CausalLM(info, threads=threads, low_memory=low_memory)
    streaming = stream and len(prompts) == 1
    result = run_generation(model, tokenizer, prompts, sampling, truncate=truncate == "left",
                            on_text=_write if streaming else None)
    if streaming:
        _write("\n")
    for number, text in enumerate(result.texts, 1):
        if not streaming:
            _write(f"[{number}] {text}\n" if len(prompts) > 1 else f"{text}\n")
    print(result.summary(), file=sys.stderr)


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
    import numpy as np
    from rich.progress import Progress

    from kninfer.runtime.bundle import read_bundle
    from kninfer.runtime.classify import classify as run_classifier
    from kninfer.runtime.classify import predict
    from kninfer.runtime.session import Classifier
    from kninfer.runtime.tokenizer import load_tokenizer

    if (file is None) == (not text):
        raise KninferError("give either --text (with --pair for pairs) or --file, not both and not neither")
    if pair and len(pair) != len(text or []):
        raise KninferError(f"{len(pair)} --pair for {len(text or [])} --text: give one --pair per --text")
    if out is not None:
        check_output_file(out)
    info = read_bundle(bundle)
    model = Classifier(info, threads=threads, low_memory=low_memory)
    tokenizer = load_tokenizer(info.tokenizer_path)
    gold = glue = None
    if file is not None:
        from kninfer.runtime.tasks import get_task, read_glue_tsv

        if not (task or info.glue_task):
            raise KninferError(f"'{info.directory}' names no glue_task: pass --task to read '{file}'")
        glue = get_task(task or info.glue_task)
        inputs, gold = read_glue_tsv(file, glue)
        if not inputs:
            raise KninferError(f"'{file}' has no rows to classify")
    else:
        columns = [[_argv_text(t, f"--{option} {n}") for n, t in enumerate(values, 1)]
                   for option, values in (("text", text), ("pair", pair)) if values]
        inputs = list(zip(*columns, strict=True))
    with Progress(console=stderr, transient=True) as progress:
        bar = progress.add_task("classifying", total=len(inputs))
        logits = run_classifier(model, tokenizer, inputs, batch_size, lambda n: progress.advance(bar, n))
    values, names = predict(model, logits)
    if file is None:
        for name in names:
            print(name)
        return
    rows = "index\tprediction\n" + "".join(f"{i}\t{n}\n" for i, n in enumerate(names))
    if out is not None:
        write_output(out, rows)
        stderr.print(f"wrote {out}")
    elif gold is None:
        _write(rows)
    if gold is not None:
        scores = glue.metrics(np.asarray(values), gold)
        shown = ", ".join(f"{name} {value:.4f}" for name, value in scores.items())
        print(f"{glue.name} {file.name}: {shown} ({len(gold)} rows)")


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
    from rich.progress import Progress

    from kninfer.runtime.bundle import read_bundle
    from kninfer.runtime.perplexity import lm_text, perplexity
    from kninfer.runtime.session import CausalLM
    from kninfer.runtime.tokenizer import encode, load_tokenizer

    try:
        text = text_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise KninferError(f"cannot read '{text_file}' as UTF-8 text: {error}") from None
    info = read_bundle(bundle)
    if info.task != "causal-lm":
        raise KninferError(f"'{bundle}' is a {info.task} bundle: perplexity needs a causal-lm bundle")
    model = CausalLM(info, threads=threads, low_memory=low_memory)
    ids = encode(load_tokenizer(info.tokenizer_path), lm_text(text))
    with Progress(console=stderr, transient=True) as progress:
        bar = progress.add_task("scoring", total=max(len(ids) - 1, 1))
        result = perplexity(model, ids, stride, max_length, lambda n: progress.advance(bar, n))
    print(f"perplexity {result.perplexity:.4f} (mean NLL {result.nll:.5f} nats over {result.tokens} tokens of "
          f"{text_file.name})")


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
COMMANDS = [generate, classify, eval_]
