"""bench/trained.py on the tiny GPT-2: a run at another --lr trains from the start, not from the first's checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

TRAINED = Path(__file__).resolve().parents[1] / "bench" / "trained.py"


@pytest.fixture(scope="module")
def trained(tiny_teacher_dir, text_file, tmp_path_factory):
    """A function: the rows of one trained.py run of the tiny `drop` student at `lr`, checkpoints under `work`."""
    root = tmp_path_factory.mktemp("trained")

    def run(lr: float, work: str, points: list[int]) -> dict[int, dict]:
        out = root / f"{work}-{lr:g}"
        argv = ["--teacher", str(tiny_teacher_dir), "--runs", "drop", "--ratio", "0.99", "--lr", str(lr),
                "--warmup-steps", "0", "--window", "32", "--batch-size", "2", "--tokens", "256", "--points",
                *map(str, points), "--data", str(text_file), "--calib", str(text_file), "--tests", str(text_file),
                "--work", str(root / work), "--out-dir", str(out), "--name", "tiny"]
        done = subprocess.run([sys.executable, str(TRAINED), *argv], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        rows = json.loads((out / "trained-tiny.json").read_text())["rows"]
        return {row["tokens"]: row for row in rows if row["student"] != "teacher"}

    return run


def test_another_lr_does_not_resume_the_first_runs_checkpoints(trained):
    first = trained(1e-2, "shared", [64])
    second = trained(1e-3, "shared", [64, 128])  # same --work: the LR 1e-2 checkpoint of step 1 is there
    fresh = trained(1e-3, "fresh", [64, 128])  # the reference: nothing to resume
    assert first[64]["train.txt"] != pytest.approx(fresh[64]["train.txt"], rel=1e-4)  # the LR shows in one step
    for point in (64, 128):
        assert second[point]["train.txt"] == pytest.approx(fresh[point]["train.txt"], rel=1e-6)
