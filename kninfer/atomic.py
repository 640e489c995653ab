"""Write files and folders under a temporary name, then rename: a crash leaves nothing half-written.

A folder output never loses a file kninfer did not write: it lists its own files in a manifest, refuses a
non-empty folder it did not write (unless `overwrite`), carries foreign files into the new copy, and swaps
old and new in one atomic rename (`renameat2(RENAME_EXCHANGE)`; where that is missing, old aside, new in,
old deleted, and the next write restores an old copy a kill left aside).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from kninfer.errors import KninferError

MANIFEST = ".kninfer-output.json"
NEW, OLD = "kninfer-new", "kninfer-old"


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, directory: bool = False, *, kind: str = "output",
                overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `target` to write into; it replaces `target` on success.

    A folder `target` must be new, empty, an earlier output of the same `kind`, or `overwrite` must be set;
    files in it that kninfer did not write are kept.
    """
    target = Path(target)
    if directory:
        with _atomic_folder(target, kind, overwrite) as tmp:
            yield tmp
        return
    _mkdir(target.parent)
    for leftover in target.parent.glob(f".{target.name}.{NEW}.*"):  # a killed run's temp file
        leftover.unlink(missing_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.{NEW}.", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        umask_permissions(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically; inside a kninfer output folder, the manifest records it as kninfer's."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    manifest = _read_manifest(path.parent)
    if manifest is not None and path.name not in manifest["files"]:
        manifest["files"] = sorted([*manifest["files"], path.name])
        with atomic_path(path.parent / MANIFEST) as tmp:
            tmp.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return path


def check_folder_output(target: str | os.PathLike, kind: str = "output", overwrite: bool = False) -> None:
    """Raise now, before any long work, if `atomic_path(target, directory=True, ...)` would refuse `target`."""
    _refuse_working_folders(Path(target))
    _foreign_files(Path(target), kind, overwrite)


@contextlib.contextmanager
def _atomic_folder(target: Path, kind: str, overwrite: bool) -> Iterator[Path]:
    _refuse_working_folders(target)
    _mkdir(target.parent)
    _recover_leftovers(target)
    foreign = _foreign_files(target, kind, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{NEW}.", dir=target.parent))
    try:
        yield tmp
        written = _files(tmp)
        (tmp / MANIFEST).write_text(json.dumps({"kind": kind, "files": written}, indent=1) + "\n")
        umask_permissions(tmp)
        for name in foreign:
            if not (tmp / name).exists():
                _carry(target / name, tmp / name)
        _swap(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _refuse_working_folders(target: Path) -> None:
    """`.`, `..` and any folder holding the working folder are never replaced."""
    resolved, cwd = target.resolve(), Path.cwd().resolve()
    if cwd == resolved or resolved in cwd.parents or target.name in ("", ".", ".."):
        raise KninferError(f"refusing to write into '{target}': it holds the working folder; name a new folder")
    if target.exists() and not target.is_dir():
        raise KninferError(f"'{target}' is a file: name a folder (or a .pt file) for this output")


def _recover_leftovers(target: Path) -> None:
    """Remove staging folders of a killed run; put back an old copy that a kill left aside."""
    for leftover in sorted(target.parent.glob(f".{target.name}.{NEW}.*")):
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in sorted(target.parent.glob(f".{target.name}.{OLD}.*")):
        if target.exists():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            os.rename(leftover, target)


def _foreign_files(target: Path, kind: str, overwrite: bool) -> list[str]:
    """Files in `target` that kninfer did not write (relative paths); refuse if that is not allowed."""
    if not target.is_dir():
        return []
    present = _files(target)
    manifest = _read_manifest(target)
    if manifest is None:
        if present and not overwrite:
            shown = ", ".join(present[:3]) + (", ..." if len(present) > 3 else "")
            raise KninferError(f"'{target}' already holds files kninfer did not write ({shown}): name a new "
                               "folder, or pass --overwrite to write there (those files are kept)")
        return present
    if manifest["kind"] != kind and not overwrite:
        raise KninferError(f"'{target}' holds a kninfer {manifest['kind']}, not a {kind}: name another folder, "
                           "or pass --overwrite")
    ours = set(manifest["files"]) | {MANIFEST}
    return [name for name in present if name not in ours]


def _files(folder: Path) -> list[str]:
    """Relative paths of the files and links under `folder` (links to folders are not followed)."""
    found = []
    for root, folders, files in os.walk(folder):
        links = [name for name in folders if os.path.islink(os.path.join(root, name))]
        found += [Path(root, name).relative_to(folder).as_posix() for name in files + links]
    return sorted(found)


def _read_manifest(folder: Path) -> dict | None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(manifest, dict) and isinstance(manifest.get("kind"), str) and isinstance(manifest.get("files"), list):
        return manifest
    return None


def _carry(source: Path, destination: Path) -> None:
    """Put a foreign file into the new copy: a hard link (the old copy keeps its own name), else a copy."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    if source.is_symlink():
        os.symlink(os.readlink(source), destination)
        return
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def _swap(new: Path, target: Path) -> None:
    """Make `new` appear at `target` in one step, then delete the old `target`."""
    if not target.exists():
        os.rename(new, target)
        return
    if _exchange(new, target):
        shutil.rmtree(new)
        return
    aside = target.parent / f".{target.name}.{OLD}.{uuid.uuid4().hex[:8]}"
    os.rename(target, aside)
    os.rename(new, target)
    shutil.rmtree(aside)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux's renameat2(RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _mkdir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise KninferError(f"cannot create '{folder}': {error.strerror}") from None


def umask_permissions(path: Path) -> None:
    """Give `path` (and a folder's files) the modes plain open()/mkdir() would: temp names are private (0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        item.chmod((0o777 if item.is_dir() else 0o666) & ~umask)
