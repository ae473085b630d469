"""Atomic file writes, and the mode of files written through a temporary file or directory."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable


def default_mode(directory: bool = False) -> int:
    """The mode open() or mkdir() would give under the current umask (mkstemp gives 0600 and
    mkdtemp 0700, which other users, a serving job say, cannot read)."""
    return (0o777 if directory else 0o666) & ~_umask()


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would, for every thread, for a moment)
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0)
        os.umask(mask)
        return mask


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Writes a file through `write(f)` so that a reader, or a crash at any moment, sees either
    the previous file whole or the new one whole: a temporary file beside the target is written,
    flushed to disk (fsync) and renamed over the target (os.replace is atomic on one file
    system); the directory is synced so the rename survives a power loss too. A new file gets
    the mode open() would give, a replaced one keeps its own. A path that is a symlink is
    followed: what it points to is replaced and the link stays (as exports do). Returns the path.
    The one atomic writer of the project: banks, reports, run files and JSON go through it."""
    path = Path(path)
    target = Path(os.path.realpath(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.{os.getpid()}-", suffix=".tmp")
    try:
        os.fchmod(fd, target.stat().st_mode & 0o777 if target.exists() else default_mode())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    sync_directory(target.parent)
    return path


def _remove_stale_temporaries(target: Path) -> None:
    """Removes the temporary files that killed writes of `target` left beside it
    (`.NAME.PID-*.tmp` of processes no longer running; `.NAME.*.tmp` of older versions, which
    named no process). A write under way in a running process is left alone."""
    for entry in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        pid = entry.name[len(target.name) + 2 :].split("-", 1)[0]
        if pid.isdigit() and (int(pid) == os.getpid() or process_running(int(pid))):
            continue
        if entry.is_file() and not entry.is_symlink():
            with contextlib.suppress(OSError):
                entry.unlink()


def process_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """`atomic_write` of `data`."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: str | os.PathLike, obj: Any, **dumps_kwargs: Any) -> Path:
    """`atomic_write_bytes` of `json.dumps(obj, **dumps_kwargs)` plus a final newline, UTF-8.
    The object is serialised before anything is written, so one that JSON cannot hold leaves
    the previous file untouched."""
    text = json.dumps(obj, **dumps_kwargs) + "\n"
    return atomic_write_bytes(path, text.encode("utf-8"))


def sync_directory(directory: Path) -> None:
    """Flushes a directory's entries (a rename or a new file in it) to disk, where the system can."""
    try:  # POSIX: a directory's entries reach the disk when the directory itself is synced
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # Windows and some file systems cannot open a directory: the rename stands
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
