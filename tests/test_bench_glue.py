"""bench/glue.py on the tiny GPT-2 and 32-row SST-2 splits: every cell, identical runs agree, re-runs train nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GLUE = REPO / "bench" / "glue.py"


@pytest.fixture(scope="module")
def mini_glue(tmp_path_factory, data_dir) -> Path:
    """SST-2's header and first 32 rows of train and dev, in GLUE's layout."""
    root = tmp_path_factory.mktemp("glue")
    (root / "SST-2").mkdir()
    for split in ("train", "dev"):
        lines = (data_dir / "glue" / "SST-2" / f"{split}.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
        (root / "SST-2" / f"{split}.tsv").write_text("".join(lines[:33]), encoding="utf-8")
    return root


def _run(glue: Path, out: Path, teacher: Path) -> dict:
    argv = [sys.executable, str(GLUE), "--models", f"teacher={teacher}", f"same={teacher}", "--losses", "ce",
            "vanilla", "--data-dir", str(glue), "--out-dir", str(out), "--work", str(out / "work"), "--name", "t",
            "--max-samples", "16", "--max-length", "32", "--batch-size", "8", "--lr", "1e-3"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600,
                          env=os.environ | {"TOKENIZERS_PARALLELISM": "false"})
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((out / "glue-t.json").read_text())


def _metrics_files(out: Path) -> dict[Path, int]:
    return {path: path.stat().st_mtime_ns for path in (out / "work").rglob("metrics.json")}


def test_every_cell_then_nothing_trained_again(tmp_path, mini_glue, tiny_teacher_dir):
    first = _run(mini_glue, tmp_path, tiny_teacher_dir)
    rows = {(row["model"], row["loss"]): row for row in first["rows"]}
    assert list(rows) == [("teacher", "ce"), ("same", "ce"), ("same", "vanilla")]
    # The same model fine-tuned the same way twice (as teacher, as student) must score the same, exactly.
    assert rows["same", "ce"]["metrics"] == rows["teacher", "ce"]["metrics"]
    for row in first["rows"]:
        assert row["score"] == pytest.approx(100 * row["metrics"]["dev"]["accuracy"], abs=1e-9)
        assert row["training_s"] is not None
    assert not list((tmp_path / "work").rglob("*.checkpoints"))  # only kept until a fine-tuning finishes
    assert "| same | vanilla |" in (tmp_path / "glue-t.md").read_text()

    mtimes = _metrics_files(tmp_path)
    assert _run(mini_glue, tmp_path, tiny_teacher_dir) == first  # the rows are done: nothing runs
    (tmp_path / "glue-t.json").unlink()
    rebuilt = _run(mini_glue, tmp_path, tiny_teacher_dir)  # read back from the work folder
    assert _metrics_files(tmp_path) == mtimes
    assert [row["metrics"] for row in rebuilt["rows"]] == [row["metrics"] for row in first["rows"]]
    assert all(row["training_s"] is None for row in rebuilt["rows"])
