"""GLUE after compression: a teacher and its students fine-tuned with each loss, dev scores side by side.

    python bench/glue.py --models teacher=DENSE odd-mlp=STUDENT drop=STUDENT --losses ce vanilla \
        --tasks sst2 --max-samples 5000 --epochs 1 --max-length 64 --batch-size 32      # SmolLM2's table so far

Every model (a saved folder, .pt, .gguf or hub name; `teacher` is the first) is fine-tuned on each --tasks task
with `kninfer.train.finetune`: the teacher with CE, each student with each of --losses (LOSSES: ce; vanilla,
soft targets from the fine-tuned teacher + CE; ilkd, the paper's fine-tuning weights; ilkd-relative, kninfer's
pre-training recipe: relative hidden-state error + CE). Every fine-tuning uses the same rows (the first
--max-samples of train), epochs, batch, LR and seed, and is scored on the whole dev split. Each one is kept under
--work as TASK/MODEL-LOSS with its metrics.json (its checkpoints until it finishes): a re-run skips what is
done and resumes an interrupted one.
Results: OUT_DIR/glue-NAME.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from reproduce import glue_score  # bench/ is on the path when this runs as a script

from kninfer.atomic import write_text
from kninfer.train import finetune
from kninfer.train.losses import KNINFER_PRETRAIN
from kninfer.train.trainer import checkpoints_beside

HERE = Path(__file__).resolve().parent
LOSSES = {  # name -> (kd mode, alphas: None for the mode's default)
    "ce": ("none", None),
    "vanilla": ("vanilla", None),
    "ilkd": ("ilkd", None),
    "ilkd-relative": ("ilkd", KNINFER_PRETRAIN),  # distill's default recipe, on a fine-tuning
}


def parse_args() -> argparse.Namespace:
    data = Path(os.environ.get("KNINFER_DATA", HERE.parent.parent / "shared" / "data"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", required=True, metavar="NAME=MODEL",
                        help="teacher=DENSE first, then the students, each NAME=MODEL.")
    parser.add_argument("--losses", nargs="+", choices=list(LOSSES), default=["ce", "vanilla"],
                        help="The students' fine-tuning losses (the teacher always trains with CE).")
    parser.add_argument("--tasks", nargs="+", default=["sst2"])
    parser.add_argument("--data-dir", type=Path, default=data / "glue", help="GLUE in its TSV layout.")
    parser.add_argument("--name", default="smollm2", help="Results go to OUT_DIR/glue-NAME.*")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "kninfer" / "glue",
                        help="Fine-tuned models and their metrics, kept for re-runs.")
    parser.add_argument("--max-samples", type=int, default=5000, help="Training rows, from the start of train.")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if any("=" not in spec for spec in args.models) or not args.models[0].startswith("teacher="):
        parser.error("--models: NAME=MODEL each, the first teacher=MODEL")
    args.models = dict(spec.split("=", 1) for spec in args.models)
    return args


def main() -> None:
    args = parse_args()
    protocol = {"max_samples": args.max_samples, "epochs": args.epochs, "max_length": args.max_length,
                "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed}
    out = args.out_dir / f"glue-{args.name}.json"
    results = json.loads(out.read_text()) if out.is_file() else {}
    if results.get("protocol") != protocol:
        results = {"protocol": protocol, "models": {}, "rows": []}
    results["models"] |= args.models
    cells = [(task, "teacher", "ce") for task in args.tasks]
    cells += [(task, model, loss) for task in args.tasks for model in args.models if model != "teacher"
              for loss in args.losses]
    done = {(row["task"], row["model"], row["loss"]) for row in results["rows"]}
    for task, model, loss in cells:
        if (task, model, loss) not in done:
            results["rows"].append(fine_tune(task, model, loss, args))
            write_text(out, json.dumps(results, indent=1))
            out.with_suffix(".md").write_text(markdown(results))
    out.with_suffix(".md").write_text(markdown(results))


def fine_tune(task: str, model: str, loss: str, args: argparse.Namespace) -> dict[str, Any]:
    """One results row: `model` fine-tuned on `task` with `loss`, or read back from its metrics under --work."""
    folder = args.work / task / f"{model}-{loss}"
    row = {"task": task, "model": model, "loss": loss, "training_s": None}
    if not (folder / "metrics.json").is_file():
        kd, alphas = LOSSES[loss]
        teacher = args.work / task / "teacher-ce" if kd != "none" else None
        started = time.perf_counter()
        finetune(args.models[model], task, data_dir=args.data_dir, teacher=teacher, kd=kd, alphas=alphas,
                 max_samples=args.max_samples, epochs=args.epochs, max_length=args.max_length,
                 batch_size=args.batch_size, lr=args.lr, seed=args.seed, out=folder, resume="auto")
        row["training_s"] = round(time.perf_counter() - started)
        shutil.rmtree(checkpoints_beside(folder), ignore_errors=True)  # only needed to resume
    metrics = json.loads((folder / "metrics.json").read_text())["metrics"]
    row |= {"metrics": metrics, "score": glue_score(metrics)}
    print(json.dumps(row), flush=True)
    return row


def markdown(results: dict[str, Any]) -> str:
    """One row per model and loss, one column per task (GLUE's score: the mean of a task's dev metrics ×100)."""
    p = results["protocol"]
    tasks = list(dict.fromkeys(row["task"] for row in results["rows"]))
    scores = {(row["model"], row["loss"], row["task"]): row["score"] for row in results["rows"]}
    lines = [f"# GLUE dev after fine-tuning (first {p['max_samples']:,} training rows, {p['epochs']:g} epoch(s), "
             f"batch {p['batch_size']}, LR {p['lr']:g}, inputs cut to {p['max_length']} tokens, seed {p['seed']})",
             "", "| model | loss | " + " | ".join(tasks) + " |", "|---|---|" + "---:|" * len(tasks)]
    for model, loss in dict.fromkeys((row["model"], row["loss"]) for row in results["rows"]):
        cells = [f"{scores[model, loss, task]:.2f}" if (model, loss, task) in scores else "" for task in tasks]
        lines.append(f"| {model} | {loss} | " + " | ".join(cells) + " |")
    lines += ["", "Models: " + "; ".join(f"{name} = `{path}`" for name, path in results["models"].items()) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
