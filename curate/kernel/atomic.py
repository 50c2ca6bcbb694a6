"""Files and folders that appear whole or not at all.

Everything is first written under a temporary name in the same folder (a leading dot and a ``.tmp-`` or
``.staging-`` marker with the writer's pid, so ``curate verify`` can tell stale leftovers from data), synced,
then renamed into place: a reader, or a process killed at any moment, never meets a half-written file, and a
failed write removes its temporary.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterator

TEMP_MARKERS = (".tmp-", ".staging-", ".old-")


def temporary_name(path: Path, marker: str = ".tmp-") -> Path:
    return path.with_name(f".{path.name}{marker}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def is_temporary(path: Path) -> bool:
    return path.name.startswith(".") and any(marker in path.name for marker in TEMP_MARKERS)


def is_stale(path: Path) -> bool:
    """A temporary whose writer (the pid in its name) no longer runs on this machine."""
    if not is_temporary(path):
        return False
    match = re.search(r"\.(?:tmp|staging|old)-(\d+)-[0-9a-f]{8}$", path.name)
    if match is None:
        return True
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def remove_stale(folder: Path, prefix: str = ".") -> list[Path]:
    """Delete the stale temporaries directly in ``folder`` whose names start with ``prefix``; returns them."""
    removed = []
    for path in folder.glob(f"{prefix}*") if folder.is_dir() else []:
        if is_stale(path):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(temporary)``, then rename the temporary onto ``path`` (removed if ``write`` fails)."""
    tmp = temporary_name(path)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic_text(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


@contextlib.contextmanager
def staged_directory(target: Path) -> Iterator[Path]:
    """A fresh folder to fill; on success it replaces ``target`` whole, on failure it is removed (and so is
    any staging folder a killed earlier attempt left beside ``target``).

    The old folder is renamed aside before the new one is renamed in and removed after, so ``target``
    never holds a mix; between the two renames (microseconds) it is absent."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target.parent, f".{target.name}.")  # what a killed earlier attempt left beside it
    staging = temporary_name(target, ".staging-")
    staging.mkdir()
    try:
        yield staging
        replace_directory(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace_directory(source: Path, target: Path) -> None:
    """Move the finished folder ``source`` to ``target``, replacing what was there."""
    old = None
    if target.exists() or target.is_symlink():
        old = temporary_name(target, ".old-")
        os.replace(target, old)
    os.replace(source, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
