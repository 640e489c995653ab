"""GLUE task table: numpy metrics against scikit-learn/scipy, and the TSV reader on the real GLUE files."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from kninfer.errors import KninferError
from kninfer.runtime.tasks import TASKS, get_task, read_glue_tsv

rng = np.random.default_rng(0)
BINARY = [(rng.integers(0, 2, 200), rng.integers(0, 2, 200)) for _ in range(3)]
BINARY.append((np.ones(10, int), np.ones(10, int)))  # degenerate: MCC undefined (sklearn says 0)
THREE = [(rng.integers(0, 3, 300), rng.integers(0, 3, 300))]


@pytest.mark.filterwarnings("ignore:A single label was found")  # sklearn on the degenerate case, on purpose
@pytest.mark.parametrize("preds, labels", BINARY + THREE)
def test_matthews_and_accuracy_match_sklearn(preds, labels):
    assert TASKS["cola"].metrics(preds, labels)["matthews_correlation"] == pytest.approx(
        matthews_corrcoef(labels, preds), abs=1e-12)
    assert TASKS["mnli"].metrics(preds, labels)["accuracy"] == pytest.approx(accuracy_score(labels, preds), abs=1e-12)


@pytest.mark.parametrize("preds, labels", BINARY + [(np.zeros(5, int), np.zeros(5, int))])
def test_f1_matches_sklearn(preds, labels):
    assert TASKS["mrpc"].metrics(preds, labels)["f1"] == pytest.approx(
        f1_score(labels, preds, zero_division=0.0), abs=1e-12)


def test_stsb_correlations_match_scipy():
    gold = np.round(rng.uniform(0, 5, 400), 1)  # rounding makes ties, which Spearman must average
    pred = gold + rng.normal(0, 1.0, 400)
    pred[:50] = np.round(pred[:50])
    got = TASKS["stsb"].metrics(pred, gold)
    assert got["pearson"] == pytest.approx(pearsonr(pred, gold)[0], abs=1e-10)
    assert got["spearmanr"] == pytest.approx(spearmanr(pred, gold)[0], abs=1e-10)


def test_predictions_argmax_or_score():
    logits = np.array([[0.1, 2.0], [3.0, -1.0]])
    assert TASKS["sst2"].predictions(logits).tolist() == [1, 0]
    assert TASKS["stsb"].predictions(np.array([[4.5], [0.5]])).tolist() == [4.5, 0.5]


@pytest.mark.parametrize("name, split, rows, counts", [
    ("cola", "dev", 1043, [322, 721]),  # no header
    ("sst2", "dev", 872, [428, 444]),
    ("mrpc", "dev", 408, [129, 279]),  # BOM in the header
    ("rte", "dev", 277, [146, 131]),  # string labels
    ("qnli", "dev", 5463, [2702, 2761]),  # fields starting with a quote
])
def test_reads_real_glue_files(data_dir, name, split, rows, counts):
    """Row and label counts as published (glue/SOURCE.md)."""
    task = TASKS[name]
    texts, labels = read_glue_tsv(data_dir / "glue" / task.folder / f"{split}.tsv", task)
    assert len(texts) == rows and all(len(t) == len(task.text_columns) for t in texts)
    assert np.bincount(labels).tolist() == counts


def test_reads_stsb_scores_and_unlabelled_test(data_dir):
    task = TASKS["stsb"]
    texts, scores = read_glue_tsv(data_dir / "glue/STS-B/dev.tsv", task)
    assert len(texts) == 1500 and scores.dtype == np.float32 and 0 <= scores.min() and scores.max() <= 5
    assert texts[0] == ("A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.")
    texts, labels = read_glue_tsv(data_dir / "glue/CoLA/test.tsv", TASKS["cola"])
    assert len(texts) == 1063 and labels is None


def test_quotes_are_kept(data_dir):
    texts, _ = read_glue_tsv(data_dir / "glue/QNLI/dev.tsv", TASKS["qnli"])
    assert texts[694][1].startswith('" ')


def test_bad_input(tmp_path):
    with pytest.raises(KninferError, match="unknown GLUE task"):
        get_task("squad")
    assert get_task("SST-2") is TASKS["sst2"]
    with pytest.raises(KninferError, match="no such file"):
        read_glue_tsv(tmp_path / "nope.tsv", TASKS["sst2"])
    bad = tmp_path / "bad.tsv"
    bad.write_text("text\tlabel\nhello\t1\n")
    with pytest.raises(KninferError, match="no column 'sentence'"):
        read_glue_tsv(bad, TASKS["sst2"])
    bad.write_text("sentence\tlabel\nhello\tpositive\n")
    with pytest.raises(KninferError, match="not sst2 labels"):
        read_glue_tsv(bad, TASKS["sst2"])
