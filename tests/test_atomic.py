"""atomic_path: the target appears whole with ordinary permissions, or not at all."""

from __future__ import annotations

import pytest

from kninfer.atomic import atomic_path


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
