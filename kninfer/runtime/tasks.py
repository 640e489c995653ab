"""The GLUE task table (columns, labels, metrics in numpy) and a reader for the original GLUE TSV files."""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kninfer.errors import KninferError


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of exact matches."""
    return float(np.mean(np.asarray(preds) == np.asarray(labels)))


def f1(preds: np.ndarray, labels: np.ndarray) -> float:
    """Binary F1 of the positive class (label 1); 0 when it is never predicted nor present."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    tp = np.sum((preds == 1) & (labels == 1))
    wrong = np.sum(preds != labels)
    return float(2 * tp / (2 * tp + wrong)) if tp + wrong else 0.0


def matthews(preds: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation coefficient (multiclass form, from the confusion matrix); 0 when undefined."""
    classes, index = np.unique(np.concatenate([labels, preds]), return_inverse=True)
    truth, guess = index[: len(labels)], index[len(labels):]
    confusion = np.zeros((len(classes), len(classes)))
    np.add.at(confusion, (truth, guess), 1)
    t, p, c, s = confusion.sum(1), confusion.sum(0), np.trace(confusion), confusion.sum()
    denominator = np.sqrt((s * s - p @ p) * (s * s - t @ t))
    return float((c * s - t @ p) / denominator) if denominator else 0.0


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation coefficient."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    x, y = x - x.mean(), y - y.mean()
    return float(x @ y / np.sqrt((x @ x) * (y @ y)))


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties given their average rank (scipy's rankdata 'average')."""
    values, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)
    return ((upper - counts + 1 + upper) / 2)[inverse]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation: Pearson on average ranks."""
    return pearson(_ranks(np.asarray(x)), _ranks(np.asarray(y)))


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task: where its TSVs live, which columns hold text and label, and how it is scored."""

    name: str
    folder: str  # GLUE layout: <data-dir>/<folder>/{train,dev,...}.tsv
    text_columns: tuple[str, ...]
    label_column: str
    labels: tuple[str, ...] | None  # class names in label-id order (HF glue's); None for regression
    metric_fns: tuple[tuple[str, Callable[[np.ndarray, np.ndarray], float]], ...]
    tsv_labels: tuple[str, ...] | None = None  # label values as written in the TSV, when not the names
    eval_splits: tuple[str, ...] = ("dev",)
    headerless: tuple[str, ...] | None = None  # column names for files without a header row (CoLA)

    @property
    def num_labels(self) -> int:
        """Classifier outputs: the number of classes, 1 for regression."""
        return 1 if self.labels is None else len(self.labels)

    def metrics(self, preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """The task's GLUE metrics for predicted ids (or scores) against the gold labels."""
        return {name: fn(np.asarray(preds), np.asarray(labels)) for name, fn in self.metric_fns}

    def predictions(self, logits: np.ndarray) -> np.ndarray:
        """Class ids (argmax) or, for regression, the single output."""
        logits = np.asarray(logits)
        return logits[..., 0] if self.labels is None else logits.argmax(-1)


_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")

TASKS: dict[str, GlueTask] = {task.name: task for task in (
    GlueTask("cola", "CoLA", ("sentence",), "label", ("unacceptable", "acceptable"),
             (("matthews_correlation", matthews),), tsv_labels=_BINARY,
             headerless=("source", "label", "original_label", "sentence")),
    GlueTask("sst2", "SST-2", ("sentence",), "label", ("negative", "positive"), (("accuracy", accuracy),),
             tsv_labels=_BINARY),
    GlueTask("mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", ("not_equivalent", "equivalent"),
             (("accuracy", accuracy), ("f1", f1)), tsv_labels=_BINARY),
    GlueTask("qqp", "QQP", ("question1", "question2"), "is_duplicate", ("not_duplicate", "duplicate"),
             (("accuracy", accuracy), ("f1", f1)), tsv_labels=_BINARY),
    GlueTask("stsb", "STS-B", ("sentence1", "sentence2"), "score", None,
             (("pearson", pearson), ("spearmanr", spearman))),
    GlueTask("mnli", "MNLI", ("sentence1", "sentence2"), "gold_label", ("entailment", "neutral", "contradiction"),
             (("accuracy", accuracy),), eval_splits=("dev_matched", "dev_mismatched")),
    GlueTask("qnli", "QNLI", ("question", "sentence"), "label", _NLI2, (("accuracy", accuracy),)),
    GlueTask("rte", "RTE", ("sentence1", "sentence2"), "label", _NLI2, (("accuracy", accuracy),)),
)}


def input_text(texts: tuple[str, ...] | list[str]) -> str:
    """One model input from a row's text fields: stripped and joined by a newline (a pair's separator)."""
    return "\n".join(t.strip() for t in texts)


def get_task(name: str) -> GlueTask:
    """The task called `name` (case and dashes ignored: SST-2, sst2), else a KninferError listing the known ones."""
    key = name.lower().replace("-", "")
    if key not in TASKS:
        raise KninferError(f"unknown GLUE task '{name}': expected one of {', '.join(TASKS)}")
    return TASKS[key]


def read_glue_tsv(path: str | Path, task: GlueTask) -> tuple[list[tuple[str, ...]], np.ndarray | None]:
    """Texts (one tuple per row) and label ids (float scores for STS-B; None if unlabelled) from a GLUE TSV."""
    path = Path(path)
    if not path.is_file():
        raise KninferError(f"'{path}': no such file (expected a GLUE {task.folder} TSV)")
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:  # utf-8-sig drops MRPC's BOM
            rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    except UnicodeDecodeError as error:
        raise KninferError(f"'{path}' is not UTF-8 text ({error.reason})") from None
    if not rows:
        raise KninferError(f"'{path}' is empty")
    header = rows[0]
    if task.headerless and not set(task.text_columns) <= set(header):
        header, rows = list(task.headerless), [header, *rows]
    missing = [c for c in task.text_columns if c not in header]
    if missing:
        raise KninferError(f"'{path}' has no column {', '.join(map(repr, missing))} (columns: {', '.join(header)})")
    text_at = [header.index(c) for c in task.text_columns]
    label_at = header.index(task.label_column) if task.label_column in header else None
    needed = max(text_at + ([] if label_at is None else [label_at])) + 1
    texts, values = [], []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) < needed:
            raise KninferError(f"'{path}' line {line}: {len(row)} fields, expected {len(header)}")
        texts.append(tuple(row[i] for i in text_at))
        if label_at is not None:
            values.append(row[label_at])
    if label_at is None:
        return texts, None
    return texts, _label_ids(values, task, path)


def _label_ids(values: list[str], task: GlueTask, path: Path) -> np.ndarray:
    if task.labels is None:
        return np.asarray(values, dtype=np.float32)
    known = {value: i for i, value in enumerate(task.tsv_labels or task.labels)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise KninferError(f"'{path}': labels {unknown[:5]} are not {task.name} labels {list(known)}")
    return np.asarray([known[v] for v in values], dtype=np.int64)
