"""Quality after equal training: compressed students distilled with one budget, scored at token points.

    python bench/trained.py --teacher ~/.cache/kninfer/smollm2/dense          # resumable: rerun to continue
    python bench/trained.py --teacher ... --points 49152 196608 --runs kronecker drop
    python bench/trained.py --teacher ... --runs drop4-kronecker --factor-lr 1e-3 --name smollm2-factor-lr1e-3
    python bench/trained.py --teacher kninfer/data/sotu-gpt2 --name miniature --runs kngpt2-ilkd distil-vanilla \
        kngpt2-ilkd-paper kngpt2-lm --init van-loan --window 256 --batch-size 16 --lr 5e-4 --points 0 614400 \
        --tests $KNINFER_DATA/sotu/test.txt --tokens 40000          # the recipes on the paper's students, in miniature
    python bench/trained.py ... (as above) --runs svd auto --ratio 0.7032 --init calibrated  # at Distil's size
    python bench/trained.py ... (as above) --runs auto distil-vanilla --seed 1 --name miniature-seed1  # another draw

Each student is built once (`kninfer.modeling.compress` with its preset at --ratio of the teacher's parameters,
calibrated on --calib tokens of WikiText-2 *valid* unless --init says otherwise) and saved under --work; then each
run distils it on --data (default the State of the Union train text) with the same batch, block size, learning
rate and seed (--seed: data order and dropout), the learning rate constant after its warm-up so that the model at
each point of --points (tokens seen) is a snapshot of one run, not a run of its own length. At each point the
student is scored on the first --tokens of each --tests text (windows of --window, stride --window). A stopped run
resumes from its last checkpoint (one per --lr); finished points are kept. With a GPU, training and scoring run
there (compression stays on the CPU).

Runs (RUNS): kronecker — low rank (A (out, 1) ⊗ B (1, in) × r) on the MLP maps of the odd blocks (`odd-mlp`), the
best student at 85% before training (bench/results/quality-smollm2.md); svd — low rank on every block map; auto —
shape and rank per map by calibrated output error (the embedded GPT-2's best at 70%, quality-miniature.md); drop —
the blocks of least influence dropped (ShortGPT); dropN-kronecker — N such blocks dropped, then kronecker for the
rest of the budget; each with the loss a user gets by default: ILKD in kninfer's
recipe (relative hidden-state error + CE, train/losses.py) where the student's layers pair with the teacher's,
vanilla KD (soft targets + CE) where they do not. The kngpt2-* and distil-* runs compare recipes on the paper's
students. Results: bench/results/trained-NAME.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from quality import log_plot  # bench/ is on the path when this runs as a script

from kninfer.atomic import write_text
from kninfer.modeling import compress, load, save
from kninfer.modeling.compress import count_parameters
from kninfer.train import distill
from kninfer.train.data import calibration_ids
from kninfer.train.eval_lm import eval_text, perplexity
from kninfer.train.losses import loss_recipe

HERE = Path(__file__).resolve().parent
SIZED = ("odd-mlp", "svd", "drop", "auto", "krony-pt")  # presets whose student size --ratio sets
RUNS = {  # name -> (compress preset, KD mode, loss recipe: None for the default, or "paper"; blocks dropped first)
    "kronecker": ("odd-mlp", "ilkd", None, 0),
    "kronecker-vanilla": ("odd-mlp", "vanilla", None, 0),
    "drop4-kronecker": ("odd-mlp", "vanilla", None, 4),
    "drop5-kronecker": ("odd-mlp", "vanilla", None, 5),
    "svd": ("svd", "ilkd", None, 0),
    "auto": ("auto", "ilkd", None, 0),
    "drop": ("drop", "vanilla", None, 0),
    "kngpt2-ilkd": ("kngpt2", "ilkd", None, 0),
    "kngpt2-ilkd-paper": ("kngpt2", "ilkd", "paper", 0),
    "kngpt2-vanilla": ("kngpt2", "vanilla", None, 0),
    "kngpt2-lm": ("kngpt2", "none", None, 0),
    "distil-vanilla": ("distil", "vanilla", None, 0),
}


def parse_args() -> argparse.Namespace:
    data = Path(os.environ.get("KNINFER_DATA", HERE.parent.parent / "shared" / "data"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", required=True, help="Dense teacher: a saved folder, .pt, .gguf or hub name.")
    parser.add_argument("--name", default="smollm2", help="Results go to OUT_DIR/trained-NAME.*")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results", help="Where results are written and resumed.")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "kninfer" / "trained",
                        help="Where students and checkpoints are kept between runs.")
    parser.add_argument("--data", type=Path, default=data / "sotu" / "train.txt", help="Training text.")
    parser.add_argument("--calib", type=Path, default=data / "wikitext-2-raw" / "wiki.valid.raw",
                        help="Calibration text.")
    parser.add_argument("--tests", type=Path, nargs="+",
                        default=[data / "wikitext-2-raw" / "wiki.test.raw", data / "sotu" / "test.txt"],
                        help="Scored texts.")
    parser.add_argument("--tokens", type=int, default=16384, help="Scored tokens of each test text.")
    parser.add_argument("--window", type=int, default=512, help="Perplexity window and training block.")
    parser.add_argument("--ratio", type=float, default=0.8, help="Student size, of the teacher's parameters.")
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=["kronecker", "drop", "svd"])
    parser.add_argument("--init", default="calibrated", help="Factor init: calibrated (on --calib) or van-loan.")
    parser.add_argument("--points", type=int, nargs="+", default=[0, 49152, 196608, 983040],
                        help="Tokens seen at which each student is scored (multiples of batch × window).")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--factor-lr", type=float, help="Learning rate of the Kronecker factors (default: --lr).")
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="Training seed: data order and dropout.")
    parser.add_argument("--save-steps", type=int, default=12,
                        help="Checkpoint every N steps (a checkpoint is also kept at each point).")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # Trainer trains on the GPU when there is one
    teacher, tokenizer = load(args.teacher)
    teacher.eval()
    step_tokens = args.batch_size * args.window
    if any(point % step_tokens for point in args.points):
        raise SystemExit(f"--points must be multiples of batch × window = {step_tokens}")
    out = args.out_dir / f"trained-{args.name}.json"
    protocol = {"teacher": args.teacher, "data": args.data.name, "calibration": args.calib.name,
                "tests": [path.name for path in args.tests], "tokens": args.tokens, "window": args.window,
                "batch_size": args.batch_size, "lr": args.lr, "warmup_steps": args.warmup_steps,
                "schedule": "constant after warm-up", "seed": args.seed}
    if args.factor_lr:
        protocol["factor_lr"] = args.factor_lr
    results = json.loads(out.read_text()) if out.is_file() else {}
    if results.get("protocol") != protocol:
        results = {"protocol": protocol, "rows": [], "training_s": {}}
    tests = {path.name: torch.tensor(tokenizer(eval_text(str(path)), verbose=False)["input_ids"][: args.tokens])
             for path in args.tests}
    done = {(row["student"], row["init"], row["tokens"]) for row in results["rows"]}
    # every student is built before any training: compression runs on the CPU, training moves the teacher
    initials = {run: build(RUNS[run][0], RUNS[run][3], teacher, tokenizer, args) for run in args.runs}
    teacher.to(device)
    if not any(row["student"] == "teacher" for row in results["rows"]):
        row = {"student": "teacher", "preset": None, "init": None, "kd": None, "recipe": None}
        record(results, out, row | score(teacher, count_parameters(teacher), 0, 0.0, tests, args.window))
    out.with_suffix(".md").write_text(markdown(results))  # also after a change to the report alone
    lrs = f"lr{args.lr:g}" + (f"-factor-lr{args.factor_lr:g}" if args.factor_lr else "")
    for run, initial in initials.items():
        preset, kd, alphas, _ = RUNS[run]
        name = f"{run}-{args.ratio:g}" if preset in SIZED else run  # e.g. kronecker-0.8: one name per student
        init = None if preset in ("drop", "distil") else args.init
        key = f"{name}-{init or 'dense'}" + (f"-seed{args.seed}" if args.seed else "")  # checkpoints, training time
        recipe = loss_recipe(kd, alphas, finetune=False)
        parameters = count_parameters(initial)
        student = initial.to(device)
        for point in sorted(args.points):
            if (name, init, point) in done:
                continue
            if point:  # resumes the last checkpoint (weights, optimizer, data position) and trains up to the point
                started = time.perf_counter()
                distill(student, str(args.data), teacher=teacher, tokenizer=tokenizer, kd=kd, alphas=recipe,
                        block_size=args.window, batch_size=args.batch_size, lr=args.lr, factor_lr=args.factor_lr,
                        max_steps=point // step_tokens, save_steps=args.save_steps, logging_steps=10,
                        checkpoints=args.work / f"{key}-{lrs}.checkpoints", resume="auto",
                        lr_scheduler_type="constant_with_warmup", warmup_steps=args.warmup_steps, seed=args.seed)
                results["training_s"][key] = results["training_s"].get(key, 0.0) + time.perf_counter() - started
            seconds = results["training_s"].get(key, 0.0) if point else 0.0
            row = {"student": name, "preset": preset, "init": init, "kd": kd, "recipe": asdict(recipe)}
            record(results, out, row | score(student, parameters, point, seconds, tests, args.window))


def build(preset: str, drop: int, teacher: Any, tokenizer: Any, args: argparse.Namespace) -> Any:
    """The student of `preset` (after `drop` blocks) at initialisation, compressed once and then read back from
    --work."""
    sized = preset in SIZED
    stem = f"drop{drop}-{preset}" if drop else preset
    folder = args.work / (f"{stem}-{args.ratio:g}-{args.init}-init" if sized else f"{stem}-{args.init}-init")
    if not (folder / "config.json").is_file():
        calibrated = args.init == "calibrated" or preset == "drop" or drop  # blocks ranked on the calibration text
        calibration = calibration_ids(str(args.calib), tokenizer, 8192, args.window) if calibrated else None
        size = {"ratio": args.ratio} if sized else {}
        student, _ = compress(teacher, preset, init=None if preset in ("drop", "distil") else args.init, drop=drop,
                              calibration=calibration, **size)
        save(student, folder, tokenizer, overwrite=True)
    return load(folder)[0]


def score(model: Any, parameters: int, tokens: int, seconds: float, tests: dict[str, torch.Tensor],
          window: int) -> dict[str, Any]:
    """The figures of one results row: the model's perplexity on each test text after `tokens` of training."""
    row = {"parameters": parameters, "tokens": tokens, "training_s": round(seconds)}
    for text, ids in tests.items():
        row[text] = perplexity(model.eval(), ids, window, window)[0]
    print(json.dumps(row), flush=True)
    return row


def record(results: dict[str, Any], out: Path, row: dict[str, Any]) -> None:
    results["rows"].append(row)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, json.dumps(results, indent=1))
    out.with_suffix(".md").write_text(markdown(results))
    plot(results, out.with_suffix(".png"))


def markdown(results: dict[str, Any]) -> str:
    protocol = results["protocol"]
    tests = protocol["tests"]
    teacher = next(row["parameters"] for row in results["rows"] if row["student"] == "teacher")
    lines = [f"# Quality after equal training: {protocol['teacher']}", "",
             f"Students (a sized preset's --ratio after its name) distilled on {protocol['data']} "
             f"(batch {protocol['batch_size']} × {protocol['window']} tokens, LR {protocol['lr']:g} "
             + (f"(factors {protocol['factor_lr']:g}) " if "factor_lr" in protocol else "")
             + f"{protocol['schedule']} of {protocol['warmup_steps']} steps, seed {protocol['seed']}); perplexity on "
             f"the first {protocol['tokens']:,} tokens of each test text, windows of {protocol['window']}.", "",
             "| student | init | loss | parameters | of teacher | tokens seen | training time | " + " | ".join(tests)
             + " |", "|---|---|---|---:|---:|---:|---:|" + "---:|" * len(tests)]
    for row in sorted(results["rows"], key=lambda r: (r["student"] != "teacher", r["student"], r["tokens"])):
        minutes = f"{row['training_s'] / 60:.1f} min"
        lines.append(f"| {row['student']} | {row['init'] or '-'} | {loss_name(row)} | {row['parameters']:,} | "
                     f"{row['parameters'] / teacher:.1%} | {row['tokens']:,} | "
                     f"{minutes} | " + " | ".join(f"{row[text]:,.2f}" for text in tests) + " |")
    return "\n".join(lines) + "\n"


def loss_name(row: dict[str, Any]) -> str:
    """A row's loss in a few words: the KD mode, its weights, ILKD's hidden form."""
    if row["recipe"] is None:
        return "-"
    weights = ",".join(f"{value:g}" for value in row["recipe"]["weights"].values())
    return f"{row['kd']} {weights}" + (f" ({row['recipe']['hidden']} hidden)" if row["kd"] == "ilkd" else "")


def plot(results: dict[str, Any], path: Path) -> None:
    """Perplexity on the first test text against tokens seen, one line per student, the teacher as a level."""
    text, lines, level = results["protocol"]["tests"][0], {}, None
    for name in dict.fromkeys(row["student"] for row in results["rows"]):
        rows = sorted((r for r in results["rows"] if r["student"] == name), key=lambda r: r["tokens"])
        if name == "teacher":
            level = ("teacher", rows[0][text])
        else:
            lines[name] = ([r["tokens"] for r in rows], [r[text] for r in rows])
    log_plot(lines, "tokens seen in training", f"perplexity ({text})", path, level)

if __name__ == "__main__":
    main()
