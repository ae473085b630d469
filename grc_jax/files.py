"""File modes for files written atomically through a temporary file or directory."""
from __future__ import annotations

import os


def default_mode(directory: bool = False) -> int:
    """The mode open() or mkdir() would give under the current umask (mkstemp gives 0600 and
    mkdtemp 0700, which other users, a serving job say, cannot read)."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask
