"""Quality at equal size: perplexity of compressed students right after compression (no training), per method.

    python bench/quality.py --teacher ~/.cache/kninfer/smollm2/dense      # a saved dense model, a .gguf or a hub name
    python bench/quality.py --teacher kninfer/data/sotu-gpt2 --text $KNINFER_DATA/sotu/test.txt --name miniature

For each --ratios fraction of the teacher's parameters, every method builds a student with `kninfer.modeling.compress`
and is scored on the same token ids: the first --tokens of --text (default WikiText-2 raw test, lines joined as
`kninfer eval` joins them) in windows of --window tokens, stride --window (each token scored once, the first of each
window unscored). Calibration (the data-aware methods): --calib-tokens of --calib (default WikiText-2 *valid*) in
blocks of --window. Methods:
- kronecker (auto): shapes and ranks per map by calibrated output error under the budget, factors fitted to the
  outputs layer by layer (the data-aware default);
- krony-pt: MLP maps, one shape, with Van Loan (rescaled, Krony-PT's) and with the calibrated fit;
- svd: every block map at one relative low rank, plain SVD and activation-aware (calibrated); and activation-aware
  on the MLP maps of every other block only (odd blocks, as the paper's pattern; where the budget allows);
- drop: whole blocks of least influence on the calibration text dropped (ShortGPT); and 4 such blocks dropped
  before low rank on the odd blocks' MLP maps makes up the rest of the budget (`--drop 4 --preset odd-mlp`);
- the paper's kngpt2 preset (its own size) once, with Van Loan and calibrated.
Results are written after each model to bench/results/quality-NAME.{json,md,png}; a rerun with the same protocol
continues where the last one stopped, one with another protocol starts afresh.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from kninfer.atomic import write_text
from kninfer.errors import KninferError
from kninfer.modeling import compress, load
from kninfer.modeling.compress import count_parameters
from kninfer.train.data import calibration_ids
from kninfer.train.eval_lm import eval_text, perplexity

HERE = Path(__file__).resolve().parent
METHODS = {  # name -> compress() keywords; "calibrated" methods get the calibration ids
    "kronecker (auto, calibrated)": {"preset": "auto", "init": "calibrated"},
    "svd (activation-aware)": {"preset": "svd", "init": "calibrated"},
    "drop (block influence)": {"preset": "drop"},
    "krony-pt (calibrated)": {"preset": "krony-pt", "init": "calibrated"},
    "krony-pt (van-loan-rescaled)": {"preset": "krony-pt", "init": "van-loan-rescaled"},
    "svd (plain)": {"preset": "svd", "init": "van-loan"},
    "svd (activation-aware, odd-block MLPs)": {"preset": "odd-mlp", "init": "calibrated"},
    "drop 4 blocks, then odd-block MLPs low rank": {"preset": "odd-mlp", "init": "calibrated", "drop": 4},
}
PAPER = {"kngpt2 (paper, van-loan)": {"preset": "kngpt2", "init": "van-loan"},
         "kngpt2 (paper, calibrated)": {"preset": "kngpt2", "init": "calibrated"}}


def parse_args() -> argparse.Namespace:
    data = Path(os.environ.get("KNINFER_DATA", HERE.parent.parent / "shared" / "data"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", required=True, help="Dense teacher: a saved folder, .pt, .gguf or hub name.")
    parser.add_argument("--name", default="smollm2", help="Results go to bench/results/quality-NAME.*")
    parser.add_argument("--text", type=Path, default=data / "wikitext-2-raw" / "wiki.test.raw", help="Scored text.")
    parser.add_argument("--calib", type=Path, default=data / "wikitext-2-raw" / "wiki.valid.raw",
                        help="Calibration text (never the scored text).")
    parser.add_argument("--tokens", type=int, default=60000, help="Scored tokens, from the start of --text.")
    parser.add_argument("--calib-tokens", type=int, default=8192, help="Calibration tokens.")
    parser.add_argument("--window", type=int, default=512, help="Perplexity window and calibration block.")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.85, 0.7], help="Student sizes.")
    parser.add_argument("--methods", nargs="+", choices=[*METHODS, *PAPER], help="A subset (default: all).")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    teacher, tokenizer = load(args.teacher)
    teacher.eval()
    window = min(args.window, teacher.config.max_position_embeddings)
    ids = torch.tensor(tokenizer(eval_text(str(args.text)), verbose=False)["input_ids"][: args.tokens])
    calibration = calibration_ids(str(args.calib), tokenizer, args.calib_tokens, window)
    out = HERE / "results" / f"quality-{args.name}.json"
    protocol = {
        "teacher": args.teacher, "text": args.text.name, "tokens": int(ids.numel()), "window": window,
        "stride": window, "calibration": args.calib.name, "calibration_tokens": int(calibration.numel()),
        "training": "none (right after compression)"}
    results = json.loads(out.read_text()) if out.is_file() else {}
    if results.get("protocol") != protocol:  # rows measured another way are not resumed from
        results = {"protocol": protocol, "rows": []}
    done = {(row["method"], row["ratio"]) for row in results["rows"]}
    chosen = args.methods or [*METHODS, *PAPER]
    jobs = [("teacher", None, None)] + [(m, None, PAPER[m]) for m in PAPER if m in chosen]
    jobs += [(m, ratio, METHODS[m]) for ratio in args.ratios for m in METHODS if m in chosen]
    for method, ratio, options in jobs:
        if (method, ratio) in done:
            continue
        started = time.perf_counter()
        if options is None:
            model = teacher
        else:
            uses_calibration = options.get("init") == "calibrated" or options["preset"] == "drop"
            try:
                model, _ = compress(teacher, options["preset"], init=options.get("init"), ratio=ratio,
                                    drop=options.get("drop", 0), calibration=calibration if uses_calibration else None)
            except KninferError as error:  # odd-mlp: a budget beyond what the odd blocks' MLP maps can give
                print(f"{method} at {ratio}: {error}")
                continue
        seconds = time.perf_counter() - started
        value, scored = perplexity(model.eval(), ids, window, window)
        row = {"method": method, "ratio": ratio, "parameters": count_parameters(model),
               "of_teacher": count_parameters(model) / count_parameters(teacher), "perplexity": value,
               "scored_tokens": scored, "compress_s": round(seconds, 1)}
        print(json.dumps(row), flush=True)
        results["rows"].append(row)
        write(results, out)


def write(results: dict[str, Any], out: Path) -> None:
    """JSON, a markdown table and a perplexity-vs-parameters plot, each replaced whole."""
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, json.dumps(results, indent=1))
    out.with_suffix(".md").write_text(markdown(results))
    plot(results, out.with_suffix(".png"))


def markdown(results: dict[str, Any]) -> str:
    protocol = results["protocol"]
    lines = [f"# Quality right after compression: {protocol['teacher']}", "",
             f"Perplexity on the first {protocol['tokens']:,} tokens of {protocol['text']} (windows of "
             f"{protocol['window']}, stride {protocol['stride']}); calibration: {protocol['calibration_tokens']:,} "
             f"tokens of {protocol['calibration']}; {protocol['training']}.", "",
             "| method | target | parameters | of teacher | perplexity | compress s |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in sorted(results["rows"], key=lambda r: (-(r["ratio"] or 2), r["perplexity"])):
        target = "" if row["ratio"] is None else f"{row['ratio']:.0%}"
        lines.append(f"| {row['method']} | {target} | {row['parameters']:,} | {row['of_teacher']:.1%} | "
                     f"{row['perplexity']:,.2f} | {row['compress_s']} |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    """Perplexity against parameters, one line per method."""
    lines = {}
    for method in dict.fromkeys(row["method"] for row in results["rows"]):
        rows = sorted((r for r in results["rows"] if r["method"] == method), key=lambda r: r["parameters"])
        lines[method] = ([r["parameters"] / 1e6 for r in rows], [r["perplexity"] for r in rows])
    log_plot(lines, "parameters (M)", f"perplexity ({results['protocol']['text']})", path)


def log_plot(lines: dict[str, tuple[list[float], list[float]]], x_label: str, y_label: str, path: Path,
             level: tuple[str, float] | None = None) -> None:
    """Lines (label -> xs, ys) on a log y axis, with an optional labelled horizontal level, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    if level is not None:
        axes.axhline(level[1], color="black", linestyle="--", label=level[0])
    for label, (xs, ys) in lines.items():
        axes.plot(xs, ys, "o-", label=label)
    axes.set_yscale("log")
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)

if __name__ == "__main__":
    main()
