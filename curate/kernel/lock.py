"""One writer per workspace: an exclusive ``flock`` on ``WORKSPACE/.curate/lock``.

A second writer refuses at once, naming the holder's pid, command and start time. Readers (``curate sql``,
recipes run with ``--dry-run``, ``curate runs``) take no lock and never block: every table is written as
whole files renamed into place, so they see the state before or after a write, never half of one.

The kernel drops a ``flock`` when its process dies, however it dies, so a lock left by a killed process is
taken over by the next writer; the holder's note it finds in the file says who that was, and is reported.
The lock is re-entrant within a process (a stage called from another stage's code holds it once).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import socket
import sys
from pathlib import Path
from typing import Iterator

LOCK_PATH = Path(".curate") / "lock"

_held: dict[Path, tuple[int, int]] = {}  # workspace root -> (file descriptor, depth)


class WorkspaceBusy(RuntimeError):
    """Another process is writing this workspace."""


def holder(root: Path) -> dict | None:
    """Who holds (or last held, if it died holding) the lock: pid, command, host, since."""
    try:
        text = (root / LOCK_PATH).read_text()
    except OSError:
        return None
    try:
        return json.loads(text) if text.strip() else None
    except json.JSONDecodeError:
        return None


@contextlib.contextmanager
def writer_lock(root: Path, *, command: str | None = None) -> Iterator[dict | None]:
    """Hold the workspace's writer lock for the block; yields the note of a dead holder it took over, if any."""
    root = root.resolve()
    if root in _held:
        descriptor, depth = _held[root]
        _held[root] = (descriptor, depth + 1)
        try:
            yield None
        finally:
            _held[root] = (descriptor, _held[root][1] - 1)
        return
    path = root / LOCK_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        note = holder(root) or {}
        raise WorkspaceBusy(
            f"workspace {root} is being written by pid {note.get('pid', '?')} on {note.get('host', '?')} "
            f"({note.get('command', 'unknown command')}, since {note.get('since', '?')}); one writer at a time: "
            "wait for it to finish (read-only commands such as curate sql and curate runs work meanwhile)"
        ) from None
    stale = holder(root)  # a note left behind means its writer died holding the lock (the kernel released it)
    note = {"pid": os.getpid(), "host": socket.gethostname(), "command": command or " ".join(sys.argv),
            "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, json.dumps(note).encode(), 0)
    _held[root] = (descriptor, 1)
    try:
        yield stale
    finally:
        del _held[root]
        os.ftruncate(descriptor, 0)  # a clean release leaves no note
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        os.close(descriptor)


def active_holder(root: Path) -> dict | None:
    """The note of the process writing the workspace now, or None. A clean release empties the note, so a
    note naming a process that no longer runs (on this host) was left by a writer that died."""
    note = holder(root)
    if not note or note.get("host") != socket.gethostname():
        return note
    try:
        os.kill(int(note["pid"]), 0)
    except (ProcessLookupError, KeyError, ValueError, TypeError):
        return None
    except PermissionError:
        pass  # it runs, as another user
    return note


def holds_lock(root: Path) -> bool:
    return root.resolve() in _held
