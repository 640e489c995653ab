"""atomic_path: the target appears whole with ordinary permissions, or not at all; files kninfer did not write
are never deleted; a kill at any step of a folder swap leaves one complete copy."""

from __future__ import annotations

import json
import os
import sys

import pytest

from kninfer import atomic
from kninfer.atomic import MANIFEST, atomic_path, write_text
from kninfer.errors import KninferError


def _write_folder(target, files: dict[str, str], **options) -> None:
    with atomic_path(target, directory=True, **options) as tmp:
        for name, text in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)


def _contents(folder) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): p.read_text() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def test_file_and_folder_get_the_modes_plain_writes_get(tmp_path):
    (tmp_path / "plain.txt").write_text("x")
    (tmp_path / "plain").mkdir()
    with atomic_path(tmp_path / "file.txt") as tmp:
        tmp.write_text("x")
    with atomic_path(tmp_path / "folder", directory=True) as tmp:
        (tmp / "inner.bin").write_bytes(b"x")
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*")}
    assert modes["file.txt"] == modes["folder/inner.bin"] == modes["plain.txt"]
    assert modes["folder"] == modes["plain"]


@pytest.mark.parametrize("directory", [False, True])
def test_failure_leaves_the_old_target_and_no_temp(tmp_path, directory):
    target = tmp_path / "out"
    target.mkdir() if directory else target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target, directory=directory) as tmp:
        (tmp / "half" if directory else tmp).write_text("half")
        raise RuntimeError
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert target.is_dir() if directory else target.read_text() == "old"


def test_folder_kninfer_did_not_write_is_refused_unless_overwrite_and_its_files_are_kept(tmp_path):
    target = tmp_path / "mywork"
    target.mkdir()
    (target / "notes.txt").write_text("notes")
    with pytest.raises(KninferError, match="kninfer did not write.*notes.txt.*--overwrite"):
        _write_folder(target, {"config.json": "new"})
    assert _contents(target) == {"notes.txt": "notes"}
    _write_folder(target, {"config.json": "new"}, overwrite=True)
    assert _contents(target) == {"notes.txt": "notes", "config.json": "new"}
    assert json.loads((target / MANIFEST).read_text())["files"] == ["config.json"]


def test_replacing_an_earlier_output_drops_its_files_and_keeps_the_users(tmp_path):
    target = tmp_path / "student"
    _write_folder(target, {"config.json": "v1", "old-only.bin": "v1"})
    (target / "README.md").write_text("mine")
    (target / "sub").mkdir()
    (target / "sub" / "data.txt").write_text("mine too")
    _write_folder(target, {"config.json": "v2"})
    assert _contents(target) == {"README.md": "mine", "sub/data.txt": "mine too", "config.json": "v2"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]  # no staging folder left


def test_output_of_another_kind_is_refused(tmp_path):
    _write_folder(tmp_path / "out", {"a": "1"}, kind="bundle")
    with pytest.raises(KninferError, match="holds a kninfer bundle, not a checkpoint"):
        _write_folder(tmp_path / "out", {"a": "2"}, kind="checkpoint")


@pytest.mark.parametrize("name", [".", "..", "", "HERE"])
def test_working_folder_and_its_parents_are_never_replaced(tmp_path, monkeypatch, name):
    inner = tmp_path / "w" / "inner"
    inner.mkdir(parents=True)
    (inner / "canary.txt").write_text("keep")
    monkeypatch.chdir(inner)
    target = inner if name == "HERE" else name
    with pytest.raises(KninferError, match="holds the working folder"):
        _write_folder(target, {"config.json": "x"}, overwrite=True)
    assert (inner / "canary.txt").read_text() == "keep"
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["inner"]


def test_write_text_into_an_output_folder_is_recorded_as_kninfers(tmp_path):
    target = tmp_path / "clf"
    _write_folder(target, {"config.json": "v1"})
    write_text(target / "metrics.json", "{}")
    assert json.loads((target / MANIFEST).read_text())["files"] == ["config.json", "metrics.json"]
    _write_folder(target, {"config.json": "v2"})  # a re-save drops the stale metrics: kninfer wrote them
    assert _contents(target) == {"config.json": "v2"}


def test_kill_during_the_fallback_swap_leaves_one_complete_copy(tmp_path, monkeypatch):
    """Without renameat2: old aside, then a kill before new moves in; the next write puts the old copy back."""
    target = tmp_path / "sc2"
    _write_folder(target, {"config.json": "old", "model.bin": "old"})
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    renames = []

    def rename_then_die(source, destination):
        renames.append(destination)
        if len(renames) == 2:
            raise KeyboardInterrupt  # stands for the kill between "old aside" and "new in"
        os.replace(source, destination)

    monkeypatch.setattr(atomic.os, "rename", rename_then_die)
    with pytest.raises(KeyboardInterrupt):
        _write_folder(target, {"config.json": "new", "model.bin": "new"})
    monkeypatch.undo()
    aside = [p for p in tmp_path.iterdir() if p.name.startswith(".sc2.kninfer-old.")]
    assert not target.exists() and len(aside) == 1
    assert _contents(aside[0]) == {"config.json": "old", "model.bin": "old"}  # the whole old copy survives
    atomic._recover_leftovers(target)  # what the next write does first
    assert _contents(target) == {"config.json": "old", "model.bin": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sc2"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")
def test_swap_is_one_atomic_exchange_on_linux(tmp_path, monkeypatch):
    target = tmp_path / "out"
    _write_folder(target, {"f": "old"})
    calls = []
    monkeypatch.setattr(atomic.os, "rename", lambda *a: calls.append(a))  # the fallback must not run
    _write_folder(target, {"f": "new"})
    assert calls == [] and _contents(target) == {"f": "new"}


def test_leftover_staging_folders_and_files_are_cleaned(tmp_path):
    (tmp_path / f".out.{atomic.NEW}.abc").mkdir()
    (tmp_path / f".out.{atomic.NEW}.abc" / "half.bin").write_text("half")
    (tmp_path / f".m.pt.{atomic.NEW}.xyz").write_text("half")
    _write_folder(tmp_path / "out", {"f": "x"})
    with atomic_path(tmp_path / "m.pt") as tmp:
        tmp.write_text("whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "out"]
