"""The issue's reproductions through the real CLI: `--out` never deletes what kninfer did not write."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch


def _kninfer(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from kninfer.cli import main; main()", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def _one_line_error(done: subprocess.CompletedProcess, pattern: str) -> None:
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and pattern in lines[0], done.stderr


@pytest.mark.parametrize("out", [".", ".."])
def test_compress_into_the_working_folder_or_its_parent_is_refused(tiny_teacher_dir, tmp_path, out):
    inner = tmp_path / "w" / "inner"
    inner.mkdir(parents=True)
    (inner / "canary.txt").write_text("keep")
    _one_line_error(_kninfer("compress", "--teacher", str(tiny_teacher_dir), "--out", out, cwd=inner),
                    "holds the working folder")
    assert (inner / "canary.txt").read_text() == "keep"


def test_compress_into_a_users_folder_needs_overwrite_and_keeps_their_files(tiny_teacher_dir, tiny_teacher,
                                                                            tmp_path):
    from kninfer.modeling.io import load

    (tmp_path / "mywork").mkdir()
    (tmp_path / "mywork" / "notes.txt").write_text("notes")
    args = ("compress", "--teacher", str(tiny_teacher_dir), "--preset", "distil", "--out", "mywork/")
    _one_line_error(_kninfer(*args, cwd=tmp_path), "--overwrite")
    assert sorted(p.name for p in (tmp_path / "mywork").iterdir()) == ["notes.txt"]
    done = _kninfer(*args, "--overwrite", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "mywork" / "notes.txt").read_text() == "notes"
    student, _ = load(tmp_path / "mywork")  # the distil preset keeps every other layer of the teacher as it was
    ids = torch.arange(10)[None]
    with torch.no_grad():
        assert torch.allclose(student.transformer.wte(ids), tiny_teacher.transformer.wte(ids), atol=0)


def test_a_pt_file_kninfer_did_not_write_is_not_replaced(tiny_teacher_dir, tmp_path):
    (tmp_path / "mine.pt").write_bytes(b"precious")
    _one_line_error(_kninfer("compress", "--teacher", str(tiny_teacher_dir), "--out", "mine.pt", cwd=tmp_path),
                    "not a kninfer checkpoint")
    assert (tmp_path / "mine.pt").read_bytes() == b"precious"
