"""The KnGPT2 paper's tables in miniature: a GPT-2 teacher trained here vs DistilGPT2-style and KnGPT2 students.

    python bench/reproduce.py                      # the full run (sizes below): about 2.5 hours on 2 CPU cores
    python bench/reproduce.py --short              # same teacher, half the student budget: about 1.5 hours
    python bench/reproduce.py --quick              # every stage with tiny sizes, in minutes: a smoke test
    python bench/reproduce.py --device cuda        # the same sizes on a GPU

Stages (each cached as a JSON file under --work-dir; a re-run skips every finished stage, and an interrupted
training resumes from its last checkpoint):
1. teacher: a GPT-2 with its own byte-level BPE, trained from scratch on sotu train (`kninfer.train.pretrain`);
2. compress: the `kngpt2` student (embedding with B (1, 2), odd layers with B (2, 1), head tied to the
   Kronecker embedding) and the `distil` student (layers 0, 2, 4 kept); their parameter counts, head counted
   once in both, must be within 3%: the vocabulary is chosen for that, V ≈ n_layer·(6·d + 13) makes the
   embedding's halving save what dropping the other half of the odd layers saves;
3. students pre-trained on sotu train with one budget (`kninfer.train.distill`, same tokens, steps, batch, LR
   schedule and seed): Distil + LM, Distil + vanilla KD, KnGPT2 + LM, KnGPT2 + ILKD, KnGPT2 + ILKD without CE;
4. perplexity on sotu test and WikiText-2 test (the WikiText-103 test text) for every LM;
5. GLUE dev (`kninfer.train.finetune`): the teacher fine-tuned with CE; Distil (+ KD) with CE and vanilla KD; KnGPT2
   (+ ILKD) with CE and ILKD from the fine-tuned teacher; the ablation students with ILKD;
6. bench/results/paper-miniature.{json,md,png} (with --short: paper-miniature-short; with --quick: in the work
   folder, named paper-miniature-quick).

Full-run sizes (FULL), for about 2.5 hours on 2 CPU cores:
- teacher: 6 layers, d 256, 4 heads, context 256, BPE vocabulary 9,216 (7.16M parameters); 800 steps × 16 blocks
  × 256 tokens = 3.3M tokens (about two passes over sotu train), LR 1e-3, cosine schedule with 5% warm-up;
- students: KnGPT2 4,804,646 and Distil 4,794,624 parameters (+0.21%); 300 steps × 16 × 256 = 1.2M tokens
  each, LR 5e-4 with linear decay, seed 0;
- perplexity: the first 100k tokens of each test text, window 256, stride 128;
- GLUE: a seeded random sample of 1,000 training rows per task, 3 epochs, batch 32, LR 1e-4, inputs cut to 128
  tokens; the whole dev split; 40 fine-tunings (25 for Table 5, 15 more for the ablation).
--short keeps the teacher and shrinks the rest (students 150 steps, 40k evaluation tokens, GLUE 500 rows for 2
epochs). Measured on the shared 2-core machine, `--short --ablation-tasks sst2` took 92.5 min (teacher 43,
students 33, perplexity 3, GLUE 14), and 76.2 min with kninfer's recipe as a sixth student on a quieter machine.
The full run with `--ablation-tasks sst2` took 137.8 min there (teacher 32, six students 67, perplexity 7, GLUE 32);
the ablation on all five tasks adds about 20 min. The run's real wall time is printed and stored with the results.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from latency import machine  # bench/ is on the path when this runs as a script
from rich.console import Console

from kninfer.atomic import atomic_path
from kninfer.errors import KninferError

HERE = Path(__file__).resolve().parent
console = Console(stderr=True, soft_wrap=True)  # one line per message, also in logs

FULL = {"n_layer": 6, "n_embd": 256, "n_head": 4, "vocab_size": 9216, "block_size": 256,
        "teacher_steps": 800, "teacher_batch": 16, "teacher_lr": 1e-3,
        "student_steps": 300, "student_batch": 16, "student_lr": 5e-4,
        "eval_tokens": 100_000, "glue_rows": 1000, "glue_epochs": 3.0, "glue_batch": 32, "glue_lr": 1e-4,
        "glue_max_length": 128, "logging_steps": 20, "save_steps": 100}
QUICK = {"n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": 416, "block_size": 64,
         "teacher_steps": 20, "teacher_batch": 8, "teacher_lr": 3e-3,
         "student_steps": 10, "student_batch": 8, "student_lr": 1e-3,
         "eval_tokens": 2048, "glue_rows": 50, "glue_epochs": 1.0, "glue_batch": 16, "glue_lr": 1e-3,
         "glue_max_length": 64, "logging_steps": 5, "save_steps": 10_000}
SHORT = {**FULL, "student_steps": 150, "eval_tokens": 40_000, "glue_rows": 500, "glue_epochs": 2.0}
SIZES = {"full": FULL, "short": SHORT, "quick": QUICK}
TASKS = ("sst2", "mrpc", "rte", "cola", "stsb")
# name -> (student to start from, KD mode, loss recipe: "paper" or None (kninfer's default), CE weight: None keeps
# the recipe's)
STUDENTS = {
    "distil-lm": ("distil-init", "none", "paper", None),
    "distil-kd": ("distil-init", "vanilla", "paper", None),
    "kngpt2-lm": ("kngpt2-init", "none", "paper", None),
    "kngpt2-ilkd": ("kngpt2-init", "ilkd", "paper", None),
    "kngpt2-kd-only": ("kngpt2-init", "ilkd", "paper", 0.0),
    "kngpt2-ilkd-kninfer": ("kngpt2-init", "ilkd", None, None),
}
# Paper values, as recalled from arXiv 2110.08152 (check them against the paper); None: "see paper".
LM_ROWS = (  # (row, model, paper WikiText-103 test perplexity)
    ("Teacher (GPT-2 architecture, trained here)", "teacher", 18.8),
    ("Distil + LM", "distil-lm", None),
    ("Distil + vanilla KD", "distil-kd", 23.7),
    ("KnGPT2 + LM", "kngpt2-lm", None),
    ("KnGPT2 + ILKD", "kngpt2-ilkd", 20.5),
    ("KnGPT2 + ILKD, kninfer's recipe (relative hidden error, CE weight 1)", "kngpt2-ilkd-kninfer", None),
)
ABLATION_ROWS = (
    ("No pre-training", "kngpt2-init", 28608),
    ("LM only", "kngpt2-lm", None),
    ("KD only (ILKD without CE)", "kngpt2-kd-only", None),
    ("LM + KD (ILKD)", "kngpt2-ilkd", None),
)
GLUE_ROWS = (  # (row, pre-trained model, fine-tuning KD mode)
    ("Teacher (fine-tuned, CE)", "teacher", "none"),
    ("Distil CE", "distil-kd", "none"),
    ("Distil vanilla KD", "distil-kd", "vanilla"),
    ("KnGPT2 CE", "kngpt2-ilkd", "none"),
    ("KnGPT2 ILKD", "kngpt2-ilkd", "ilkd"),
)
TEXTS = ("sotu", "wikitext2")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help="Tiny teacher and step counts: every stage in minutes.")
    preset.add_argument("--short", action="store_true",
                        help="The full run's teacher, half the students' steps, fewer evaluation tokens and GLUE rows.")
    parser.add_argument("--data-dir", type=Path, default=os.environ.get("KNINFER_DATA"),
                        help="The offline data folder with sotu/, wikitext-2-raw/ and glue/ (default: $KNINFER_DATA).")
    parser.add_argument("--work-dir", type=Path,
                        help="Where models and stage results are cached (default: ~/.cache/kninfer/paper-miniature, "
                             "-short or -quick with --short or --quick).")
    parser.add_argument("--results-dir", type=Path,
                        help="Where the JSON, markdown and PNG go (default: bench/results; with --quick: the work "
                             "folder, so a smoke test never lands among real results).")
    parser.add_argument("--tasks", default=",".join(TASKS), help="Comma-separated GLUE tasks of the Table 5 analogue.")
    parser.add_argument("--ablation-tasks",
                        help="Comma-separated GLUE tasks the ablation students are fine-tuned on (default: --tasks).")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        help="Where to train and evaluate (default: cuda when available, else cpu).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of every stage (data order, init, new heads).")
    args = parser.parse_args(argv)
    if args.data_dir is None:
        parser.error("--data-dir is required when $KNINFER_DATA is not set")
    try:
        args.tasks = _task_list(args.tasks)
        args.ablation_tasks = _task_list(args.ablation_tasks) if args.ablation_tasks else args.tasks
    except KninferError as error:
        parser.error(str(error))
    if not args.tasks or not args.ablation_tasks:
        parser.error("--tasks and --ablation-tasks need at least one GLUE task")
    args.sizes = "quick" if args.quick else "short" if args.short else "full"
    suffix = "" if args.sizes == "full" else f"-{args.sizes}"
    args.work_dir = args.work_dir or Path.home() / ".cache" / "kninfer" / f"paper-miniature{suffix}"
    args.results_dir = args.results_dir or (args.work_dir if args.quick else HERE / "results")
    args.stem = f"paper-miniature{suffix}"
    return args


def _task_list(text: str) -> list[str]:
    from kninfer.runtime.tasks import get_task

    return [get_task(name).name for name in text.split(",") if name.strip()]


class Stages:
    """Runs each named stage once: its result is a JSON file under the work folder, read back on a re-run."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.log: dict[str, dict[str, Any]] = {}

    def run(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        path = self.folder / "stages" / f"{name}.json"
        if path.is_file():
            result = json.loads(path.read_text())
            self.log[name] = {"ran": False, "time_s": result["time_s"]}
            console.print(f"[dim]cached[/dim] {name}")
            return result
        console.rule(f"[bold]{name}")
        started = time.perf_counter()
        result = fn()
        result["time_s"] = time.perf_counter() - started
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(result, indent=1) + "\n")
        self.log[name] = {"ran": True, "time_s": result["time_s"]}
        return result


class Run:
    """The stages of one reproduction, with their paths and sizes."""

    def __init__(self, args: argparse.Namespace, sizes: dict[str, Any]) -> None:
        self.args, self.sizes = args, sizes
        self.work = args.work_dir
        self.stages = Stages(self.work)
        self.sotu = str(args.data_dir / "sotu")
        self.wikitext = str(args.data_dir / "wikitext-2-raw" / "wiki.test.raw")
        self.glue = args.data_dir / "glue"
        self._test_ids: dict[str, Any] = {}

    def model(self, name: str) -> Path:
        return self.work / "models" / name

    def teacher(self) -> dict[str, Any]:
        """Train the teacher from scratch (the HF Trainer inside resumes from its last checkpoint)."""
        from kninfer.modeling.compress import count_parameters
        from kninfer.train import pretrain
        from kninfer.train.trainer import checkpoints_beside

        s, out = self.sizes, self.model("teacher")
        model = pretrain(self.sotu, out, n_layer=s["n_layer"], n_embd=s["n_embd"], n_head=s["n_head"],
                         vocab_size=s["vocab_size"], block_size=s["block_size"], max_steps=s["teacher_steps"],
                         batch_size=s["teacher_batch"], lr=s["teacher_lr"], seed=self.args.seed)
        _remove_checkpoints(checkpoints_beside(out))
        log = json.loads((out / "train_log.json").read_text())
        return {"parameters": count_parameters(model), "steps": s["teacher_steps"],
                "tokens": s["teacher_steps"] * s["teacher_batch"] * s["block_size"],
                "vocab_size": model.config.vocab_size,
                "valid_loss": next((e["eval_loss"] for e in reversed(log) if "eval_loss" in e), None)}

    def compress(self) -> dict[str, Any]:
        """Both students from the teacher, and the equal-size check (head counted once: tied in both)."""
        from kninfer.modeling.compress import compress, count_parameters
        from kninfer.modeling.io import load, save

        teacher, tokenizer = load(self.model("teacher"))
        counts = {}
        for name, options in (("kngpt2", {"tie_head": True}), ("distil", {})):
            student, _ = compress(teacher, name, **options)
            save(student, self.model(f"{name}-init"), tokenizer)
            counts[name] = {"parameters": count_parameters(student),
                            "parameters_without_untied_head": count_parameters(student, include_head=False)}
        kn, distil = counts["kngpt2"]["parameters"], counts["distil"]["parameters"]
        difference = (kn - distil) / distil
        if abs(difference) > 0.03:
            console.print(f"[yellow]warning: the students differ by {difference:+.1%} in size (limit 3%)")
        return {"teacher": count_parameters(teacher), "students": counts, "relative_difference": difference,
                "within_3_percent": abs(difference) <= 0.03,
                "head": "tied to the input embedding in both students (KnGPT2: the Kronecker embedding's .attend()), "
                        "counted once", "kngpt2_options": {"tie_head": True, "odd_layers": "0-based odd (1, 3, ...)"}}

    def student(self, name: str) -> dict[str, Any]:
        """Pre-train one student on sotu train with the shared budget (`kninfer.train.distill`)."""
        from kninfer.modeling.compress import count_parameters
        from kninfer.train import distill
        from kninfer.train.losses import Recipe, loss_recipe
        from kninfer.train.trainer import checkpoints_beside

        start, kd, alphas, ce = STUDENTS[name]
        recipe = loss_recipe(kd, alphas, finetune=False)
        recipe = recipe if ce is None else Recipe(recipe.weights | {"ce": ce}, recipe.hidden)
        s, out = self.sizes, self.model(name)
        student = distill(self.model(start), self.sotu, teacher=self.model("teacher") if kd != "none" else None,
                          kd=kd, alphas=recipe, block_size=s["block_size"], batch_size=s["student_batch"],
                          lr=s["student_lr"], max_steps=s["student_steps"],
                          logging_steps=s["logging_steps"], save_steps=s["save_steps"], out=out, resume="auto",
                          seed=self.args.seed, log=console.print)
        _remove_checkpoints(checkpoints_beside(out))
        return {"parameters": count_parameters(student), "start": start, "kd": kd, "alphas": recipe.weights,
                "hidden": recipe.hidden,
                "steps": s["student_steps"], "tokens": s["student_steps"] * s["student_batch"] * s["block_size"]}

    def perplexity(self, name: str) -> dict[str, Any]:
        """Sliding-window perplexity (window = context, stride = half) on sotu test and WikiText-2 test."""
        from kninfer.modeling.compress import count_parameters
        from kninfer.modeling.io import load
        from kninfer.train.eval_lm import perplexity

        model, tokenizer = load(self.model(name))
        model.to(self.args.device)
        block = model.config.max_position_embeddings
        result: dict[str, Any] = {"parameters": count_parameters(model), "window": block, "stride": block // 2}
        for text in TEXTS:
            ids = self.test_ids(text, tokenizer)
            value, tokens = perplexity(model, ids, block, block // 2)
            result[text] = {"perplexity": value, "tokens": tokens}
            console.print(f"{name} {text}: perplexity {value:.2f} over {tokens:,} tokens")
        return result

    def test_ids(self, text: str, tokenizer: Any):
        """The first `eval_tokens` ids of a test text, read as `kninfer eval-lm` reads it."""
        import torch

        from kninfer.train.eval_lm import eval_text

        if text not in self._test_ids:
            source = eval_text(self.sotu, "test") if text == "sotu" else eval_text(self.wikitext)
            ids = tokenizer(source, verbose=False)["input_ids"]
            self._test_ids[text] = torch.tensor(ids[: self.sizes["eval_tokens"]])
        return self._test_ids[text]

    def glue_sample(self, task: str) -> dict[str, Any]:
        """A seeded random sample of `glue_rows` training rows (the files are ordered by genre and source) + dev."""
        import random

        from kninfer.runtime.tasks import get_task

        folder = get_task(task).folder
        lines = (self.glue / folder / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
        header, rows = ([], lines) if get_task(task).headerless else (lines[:1], lines[1:])
        count = min(self.sizes["glue_rows"], len(rows))
        keep = sorted(random.Random(self.args.seed).sample(range(len(rows)), count))
        out = self.work / "glue-data" / folder
        with atomic_path(out / "train.tsv") as tmp:
            tmp.write_text("".join(header + [rows[i] for i in keep]), encoding="utf-8")
        with atomic_path(out / "dev.tsv") as tmp:
            shutil.copyfile(self.glue / folder / "dev.tsv", tmp)
        return {"train_rows": len(keep), "of": len(rows)}

    def finetune(self, task: str, name: str, kd: str) -> dict[str, Any]:
        """Fine-tune a pre-trained model on a GLUE task (`kninfer.train.finetune`) and score the dev split."""
        from kninfer.train import finetune
        from kninfer.train.trainer import checkpoints_beside

        s, out = self.sizes, self.glue_model(task, name, kd)
        teacher = self.glue_model(task, "teacher", "none") if kd != "none" else None
        _, metrics = finetune(self.model(name), task, data_dir=self.work / "glue-data", teacher=teacher, kd=kd,
                              max_length=s["glue_max_length"], batch_size=s["glue_batch"], lr=s["glue_lr"],
                              epochs=s["glue_epochs"], logging_steps=s["logging_steps"], save_steps=s["save_steps"],
                              out=out, resume="auto", seed=self.args.seed, log=console.print)
        _remove_checkpoints(checkpoints_beside(out))
        return {"metrics": metrics, "score": glue_score(metrics)}

    def glue_model(self, task: str, name: str, kd: str) -> Path:
        return self.work / "glue" / task / f"{name}-{kd}"

    def all(self) -> dict[str, Any]:
        """Every stage, in dependency order; the results keyed by stage name."""
        run = self.stages.run
        results = {"teacher": run("teacher", self.teacher), "compress": run("compress", self.compress)}
        for name in STUDENTS:
            results[f"lm/{name}"] = run(f"lm/{name}", lambda name=name: self.student(name))
        for name in ("teacher", "kngpt2-init", *STUDENTS):
            results[f"ppl/{name}"] = run(f"ppl/{name}", lambda name=name: self.perplexity(name))
        for task in dict.fromkeys(self.args.tasks + self.args.ablation_tasks):
            results[f"glue-data/{task}"] = run(f"glue-data/{task}", lambda task=task: self.glue_sample(task))
        jobs = [(task, model, kd) for task in self.args.tasks for _, model, kd in GLUE_ROWS]
        jobs += [(task, model, "ilkd") for task in self.args.ablation_tasks for _, model, _ in ABLATION_ROWS]
        for task, model, kd in dict.fromkeys(jobs):  # the teacher of each task first; shared rows once
            name = f"glue/{task}/{model}-{kd}"
            results[name] = run(name, lambda t=task, m=model, k=kd: self.finetune(t, m, k))
        return results


def _remove_checkpoints(folder: Path) -> None:
    """A finished stage's optimizer checkpoints are only needed to resume it."""
    shutil.rmtree(folder, ignore_errors=True)


def glue_score(metrics: dict[str, dict[str, float]]) -> float:
    """GLUE's per-task score ×100: the mean of the task's metrics (MRPC acc/F1, STS-B Pearson/Spearman)."""
    values = [v for split in metrics.values() for v in split.values()]
    return 100 * sum(values) / len(values)


def tables(results: dict[str, Any], args: argparse.Namespace, sizes: dict[str, Any]) -> dict[str, Any]:
    """The three tables, each row with the paper's figure beside ours, from the stage results."""
    def lm(row: str, model: str, paper: float | None) -> dict[str, Any]:
        training = results["teacher"] if model == "teacher" else results.get(f"lm/{model}")
        ppl = results[f"ppl/{model}"]
        return {"row": row, "model": model, "parameters": ppl["parameters"],
                "train_tokens": training["tokens"] if training else 0,
                "train_steps": training["steps"] if training else 0,
                "train_wall_time_s": training["time_s"] if training else results["compress"]["time_s"],
                **{f"{text}_test_ppl": ppl[text]["perplexity"] for text in TEXTS},
                "paper_wikitext103_ppl": paper}

    def glue(row: str, model: str, kd: str, tasks: list[str]) -> dict[str, Any]:
        runs = {task: results[f"glue/{task}/{model}-{kd}"] for task in tasks}
        scores = {task: r["score"] for task, r in runs.items()}
        return {"row": row, "model": model, "finetune_kd": kd, "scores": scores,
                "metrics": {task: r["metrics"] for task, r in runs.items()},
                "average": sum(scores.values()) / len(scores)}

    ablation = []
    for row, model, paper in ABLATION_ROWS:
        entry = lm(row, model, None)
        del entry["paper_wikitext103_ppl"]
        glue_entry = glue(row, model, "ilkd", args.ablation_tasks)
        ablation.append(entry | {"glue_scores": glue_entry["scores"], "glue_average": glue_entry["average"],
                                 "paper_ppl": paper})
    return {"lm": [lm(*row) for row in LM_ROWS], "ablation": ablation,
            "glue": [glue(row, model, kd, args.tasks) | {"paper": None} for row, model, kd in GLUE_ROWS]}


def findings(t: dict[str, Any]) -> list[str]:
    """Plain answers to the issue's questions, computed from the tables."""
    lm = {r["model"]: r for r in t["lm"]}
    kn, distil, teacher = lm["kngpt2-ilkd"], lm["distil-kd"], lm["teacher"]
    lines = []
    for text, label in (("sotu", "sotu test"), ("wikitext2", "WikiText-2 test")):
        k, d, te = kn[f"{text}_test_ppl"], distil[f"{text}_test_ppl"], teacher[f"{text}_test_ppl"]
        lines.append(f"{label}: KnGPT2 + ILKD {k:.2f} vs Distil + vanilla KD {d:.2f} "
                     f"({'KnGPT2 better' if k < d else 'Distil better'}; paper 20.5 vs 23.7); "
                     f"teacher {te:.2f}, KnGPT2 + ILKD is {k / te - 1:+.1%} from it (paper +9%; aim within 10%).")
    own, paper, plain = (lm[m]["sotu_test_ppl"] for m in ("kngpt2-ilkd-kninfer", "kngpt2-ilkd", "kngpt2-lm"))
    best_distil = min(lm[m]["sotu_test_ppl"] for m in ("distil-lm", "distil-kd"))
    lines.append(f"kninfer's ILKD recipe (sotu test): KnGPT2 {own:.2f} against {paper:.2f} with the paper's weights, "
                 f"{plain:.2f} with LM only and {best_distil:.2f} for the best Distil row "
                 f"({'ILKD beats LM' if own < plain else 'LM beats ILKD'}; "
                 f"{'KnGPT2 ahead of Distil' if own < best_distil else 'Distil ahead of KnGPT2'}).")
    ablation = {r["model"]: r for r in t["ablation"]}
    none, trained = ablation["kngpt2-init"], [r for r in t["ablation"] if r["model"] != "kngpt2-init"]
    collapse = all(none["sotu_test_ppl"] > 2 * r["sotu_test_ppl"] for r in trained)
    best = max(t["ablation"], key=lambda r: r["glue_average"])
    lines.append(f"Ablation: no pre-training gives sotu test perplexity {none['sotu_test_ppl']:,.0f} "
                 f"({'collapsed: more than twice every pre-trained variant' if collapse else 'not collapsed'}; "
                 f"paper 28,608); best GLUE average: {best['row']} ({best['glue_average']:.1f}; paper: LM + KD).")
    glue = {(r["model"], r["finetune_kd"]): r["average"] for r in t["glue"]}
    kn_glue, teacher_glue = glue[("kngpt2-ilkd", "ilkd")], glue[("teacher", "none")]
    distil_glue = max(glue[("distil-kd", "none")], glue[("distil-kd", "vanilla")])
    lines.append(f"GLUE dev average: KnGPT2 ILKD {kn_glue:.1f}, teacher {teacher_glue:.1f} "
                 f"({kn_glue - teacher_glue:+.1f} points; aim within about 1), best Distil row {distil_glue:.1f} "
                 f"({'KnGPT2 above' if kn_glue > distil_glue else 'KnGPT2 not above'}).")
    return lines


def differences(sizes: dict[str, Any], results: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """Every way this setup differs from the paper's."""
    s, teacher, own = sizes, results["teacher"], results["lm/kngpt2-ilkd-kninfer"]
    own_weights = ", ".join(f"{term} {weight:g}" for term, weight in own["alphas"].items())
    student_tokens = s["student_steps"] * s["student_batch"] * s["block_size"]
    missing = sorted(set(TASKS) - set(args.tasks))
    left_out = f", and so are {', '.join(missing)} in this run" if missing else ""
    return [
        f"Teacher: a GPT-2-architecture model with {s['n_layer']} layers, d {s['n_embd']}, {s['n_head']} heads, "
        f"context {s['block_size']}, {teacher['parameters']:,} parameters, trained here from scratch for "
        f"{teacher['tokens']:,} tokens. Paper: GPT-2 small (12 layers, d 768, 124M parameters, context 1024), "
        "pre-trained by OpenAI on WebText.",
        f"Tokenizer: our own byte-level BPE of {teacher['vocab_size']:,} tokens trained on sotu train, sized so that "
        "the two students are of equal size (V ≈ n_layer·(6·d + 13)); paper: GPT-2's 50,257 tokens. Perplexities "
        "are per token of a different tokenizer and corpus, so only the order and ratios of rows compare with the "
        "paper, never the absolute values.",
        f"Corpus: State of the Union addresses 1790-2021 (1.41M words of training text) for the teacher and the "
        f"students; the paper pre-trains the students on OpenWebText (see the paper for the amount). Each student "
        f"here sees {student_tokens:,} tokens ({s['student_steps']} steps × {s['student_batch']} blocks × "
        f"{s['block_size']} tokens, LR {s['student_lr']} with linear decay, seed {args.seed}).",
        f"LM evaluation: the first {s['eval_tokens']:,} tokens of sotu test and of WikiText-2 test (the same text as "
        "WikiText-103 test), sliding window of the context with half-window stride, zero-shot: WikiText-2/103 train "
        "is not available offline, so no model is fine-tuned on WikiText, which is out of domain for a "
        "speech-trained model. The paper's column is WikiText-103 test perplexity.",
        "Distil student: every other layer of our teacher (0, 2, 4, ...), trained here with the same budget as "
        "KnGPT2; the paper's DistilGPT2 is Hugging Face's release (6 of 12 layers, trained on OpenWebText).",
        "KnGPT2 student: embedding with B (1, 2) and every linear map of the odd layers (0-based 1, 3, 5) with "
        "B (2, 1), rank 1, Van Loan initialisation, Q/K/V factored separately; the LM head is tied to the Kronecker "
        "embedding, so both students hold exactly the parameters counted (the paper's 83M leaves its output "
        "embedding out of the count).",
        "Loss weights: ILKD pre-training 0.5/0.5/0.5/0.1 (embedding/attention/hidden/CE), fine-tuning "
        "0.5/0.5/0.5/0.02, vanilla KD 0.5/0.5 at temperature 2 (kninfer.train.losses); KD only sets the CE "
        "weight to 0. The row 'kninfer's recipe' pre-trains with kninfer's default ILKD instead: hidden states by "
        f"{own['hidden']} error (‖s − t‖² / ‖t‖² per position, mean over layers), weights {own_weights}.",
        f"GLUE: a seeded random sample of {s['glue_rows']:,} training rows of each task ({s['glue_epochs']:g} "
        f"epoch(s), batch {s['glue_batch']}, LR {s['glue_lr']}, inputs truncated to {s['glue_max_length']} tokens), "
        "the whole dev split, one seed, no hyper-parameter search; score = GLUE's per-task convention (MRPC mean "
        "of accuracy and F1, STS-B mean of Pearson and Spearman, CoLA Matthews). MNLI, QQP and QNLI are left "
        f"out (no training data offline){left_out}. The ablation students are fine-tuned with ILKD on "
        f"{', '.join(args.ablation_tasks)}.",
        "No model selection on sotu valid (the last step is evaluated; valid only gives the teacher's eval loss); "
        "one seed, no repeats, so differences of a fraction of a point are within noise.",
        f"Hardware: {args.device}, fp32, {os.cpu_count()} logical cores, shared with other work while it ran "
        "(wall times are indicative only); the paper trained on GPUs.",
    ]


def write_outputs(report: dict[str, Any], folder: Path, stem: str) -> list[Path]:
    """<stem>.json, .md and .png, each written atomically."""
    paths = [folder / f"{stem}.{ext}" for ext in ("json", "md", "png")]
    with atomic_path(paths[0]) as tmp:
        tmp.write_text(json.dumps(report, indent=1) + "\n")
    with atomic_path(paths[1]) as tmp:
        tmp.write_text(markdown(report))
    with atomic_path(paths[2]) as tmp:
        plot(report, tmp)
    return paths


def _num(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "see paper"
    return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def markdown(report: dict[str, Any]) -> str:
    """The tables, findings and differences as a markdown page."""
    t, size = report["tables"], report["equal_size"]
    quick = " — QUICK SMOKE RUN: these numbers mean nothing" if report["quick"] else ""
    lines = [f"# The KnGPT2 paper's tables in miniature{quick}",
             "", f"Made {report['finished']} on {report['device']} ({report['machine']['cpu']}) by "
             f"`{' '.join(report['command'])}`; wall time of this run {report['wall_time_s'] / 60:.1f} min, "
             f"all stages together {report['stage_time_s'] / 60:.1f} min.",
             "", "Paper figures are from arXiv 2110.08152 as recalled (GPT-2 small teacher ≈ 18.8): check them "
             "against the paper. Only the figures the issue quotes are given; the rest read \"see paper\".",
             "", "## Equal size", "",
             f"KnGPT2 student {size['students']['kngpt2']['parameters']:,} parameters, Distil student "
             f"{size['students']['distil']['parameters']:,} ({size['relative_difference']:+.2%}; within 3%: "
             f"{'yes' if size['within_3_percent'] else 'NO'}); head {size['head']}. Teacher {size['teacher']:,}.",
             "", "## Table 3/4 analogue: language modelling", "",
             "| model | parameters | training tokens | training wall time | sotu test ppl | WikiText-2 test ppl "
             "| paper: WikiText-103 ppl |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in t["lm"]:
        lines.append(f"| {r['row']} | {r['parameters']:,} | {r['train_tokens']:,} | "
                     f"{r['train_wall_time_s'] / 60:.1f} min | {r['sotu_test_ppl']:.2f} | "
                     f"{r['wikitext2_test_ppl']:.2f} | {_num(r['paper_wikitext103_ppl'], 1)} |")
    tasks = list(t["ablation"][0]["glue_scores"])
    lines += ["", "## Table 7 analogue: ablation of KnGPT2's pre-training", "",
              f"GLUE: ILKD fine-tuning from the fine-tuned teacher on {', '.join(tasks)}.", "",
              "| pre-training | training tokens | sotu test ppl | WikiText-2 test ppl | "
              + " | ".join(tasks) + " | GLUE average | paper: ppl |",
              "| --- | ---: | ---: | ---: | " + "---: | " * len(tasks) + "---: | ---: |"]
    for r in t["ablation"]:
        lines.append(f"| {r['row']} | {r['train_tokens']:,} | {r['sotu_test_ppl']:,.2f} | "
                     f"{r['wikitext2_test_ppl']:,.2f} | " + " | ".join(f"{r['glue_scores'][k]:.1f}" for k in tasks)
                     + f" | {r['glue_average']:.1f} | {_num(r['paper_ppl'], 0)} |")
    tasks = list(t["glue"][0]["scores"])
    lines += ["", "## Table 5 analogue: GLUE dev", "",
              "| model | " + " | ".join(tasks) + " | average | paper |", "| --- |" + " ---: |" * (len(tasks) + 2)]
    for r in t["glue"]:
        lines.append(f"| {r['row']} | " + " | ".join(f"{r['scores'][k]:.1f}" for k in tasks)
                     + f" | {r['average']:.1f} | see paper |")
    lines += ["", "Scores ×100: accuracy (SST-2, RTE), mean of accuracy and F1 (MRPC), Matthews correlation (CoLA), "
              "mean of Pearson and Spearman (STS-B).", "", "## What the numbers say", ""]
    lines += [f"- {line}" for line in report["findings"]]
    lines += ["", "## How this setup differs from the paper's", ""] + [f"- {line}" for line in report["differences"]]
    lines += ["", f"![perplexity vs parameters]({report['files']['png']})", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """Test perplexity against parameters for every language model: one panel per text, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {r["model"]: r for r in report["tables"]["lm"]}
    for r in report["tables"]["ablation"]:
        rows.setdefault(r["model"], r | {"row": f"KnGPT2, {r['row'].lower()}"})
    fig, axes = plt.subplots(1, 2, figsize=(11, 5), sharey=True)
    markers = "o^vsDPX*"
    for ax, (text, title) in zip(axes, (("sotu", "sotu test"), ("wikitext2", "WikiText-2 test")), strict=True):
        for marker, r in zip(markers, rows.values(), strict=False):
            ax.scatter(r["parameters"] / 1e6, r[f"{text}_test_ppl"], marker=marker, s=60, alpha=0.8, label=r["row"])
        ax.set_yscale("log")
        ax.set_xlabel("parameters (millions, head counted once)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("perplexity (log scale)")
    axes[1].legend(fontsize=8, loc="best")
    quick = " (quick smoke run)" if report["quick"] else ""
    fig.suptitle(f"KnGPT2 paper in miniature: perplexity vs parameters{quick}")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def check_data(data_dir: Path, tasks: list[str]) -> None:
    """Fail at once, with the path, when an input is missing."""
    from kninfer.runtime.tasks import get_task

    needed = [data_dir / "sotu" / f"{split}.txt" for split in ("train", "valid", "test")]
    needed += [data_dir / "wikitext-2-raw" / "wiki.test.raw"]
    needed += [data_dir / "glue" / get_task(t).folder / f"{split}.tsv" for t in tasks for split in ("train", "dev")]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise KninferError(f"--data-dir '{data_dir}' lacks {', '.join(missing[:3])}{more}")


def check_config(work: Path, config: dict[str, Any]) -> None:
    """A work folder holds one configuration: reusing its stages with other sizes would mix runs."""
    path = work / "config.json"
    if path.is_file():
        previous = json.loads(path.read_text())
        if previous != config:
            changed = sorted(k for k in config.keys() | previous.keys() if config.get(k) != previous.get(k))
            raise KninferError(f"'{work}' holds a run with other settings ({', '.join(changed)}): use another "
                               "--work-dir or delete it")
        return
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(config, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch starts: every Trainer then stays on the CPU
    started, wall = dt.datetime.now(dt.timezone.utc), time.perf_counter()
    try:
        check_data(args.data_dir, sorted(set(args.tasks + args.ablation_tasks)))
        import torch

        if args.device == "cuda" and not torch.cuda.is_available():
            raise KninferError("--device cuda: no CUDA device is available")
        args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch.manual_seed(args.seed)
        if args.quick:
            torch.set_num_threads(1)  # tiny matrices: on busy cores extra threads cost far more than they give
        sizes = SIZES[args.sizes]
        check_config(args.work_dir, {"sizes": sizes, "seed": args.seed, "data_dir": str(args.data_dir.resolve())})
        run = Run(args, sizes)
        results = run.all()
    except KninferError as error:
        console.print(f"[red]error:[/red] {error}")
        return 2
    except KeyboardInterrupt:  # also TrainingInterrupted: a training stopped by Ctrl-C at a saved checkpoint
        console.print("interrupted: run the same command again to continue (finished stages are kept, a stopped "
                      "training resumes from its checkpoint)")
        return 130
    wall_time = time.perf_counter() - wall
    t = tables(results, args, sizes)
    report = {
        "schema": "kninfer-paper-miniature", "schema_version": 1, "quick": args.quick,
        "command": ["bench/reproduce.py", *(sys.argv[1:] if argv is None else argv)],
        "started": started.isoformat(timespec="seconds"),
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_time_s": wall_time, "stage_time_s": sum(v["time_s"] for v in run.stages.log.values()),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "machine": machine(torch.get_num_threads()),
        "sizes": sizes, "seed": args.seed, "tasks": args.tasks, "ablation_tasks": args.ablation_tasks,
        "equal_size": {k: v for k, v in results["compress"].items() if k != "time_s"},
        "tables": t, "findings": findings(t), "differences": differences(sizes, results, args),
        "stages": run.stages.log, "files": {"png": f"{args.stem}.png"},
        "paper": {"source": "arXiv 2110.08152, figures as recalled: check against the paper",
                  "table3_4_wikitext103_ppl": {"teacher (GPT-2 small, approximately)": 18.8,
                                               "DistilGPT2 + KD": 23.7, "KnGPT2 + ILKD": 20.5},
                  "table7_no_pretraining_ppl": 28608},
    }
    paths = write_outputs(report, args.results_dir, args.stem)
    console.print("\n".join(report["findings"]))
    console.print(f"wall time {wall_time / 60:.1f} min (all stages together, over every run: "
                  f"{report['stage_time_s'] / 60:.1f} min); wrote {', '.join(map(str, paths))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
