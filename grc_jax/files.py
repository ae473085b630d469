"""File modes for files written atomically through a temporary file or directory."""
from __future__ import annotations

import os


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
