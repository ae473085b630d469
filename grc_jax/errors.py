"""User errors, and the one way the command lines report them.

A `UserError` is bad input from the person running a command (a data file, a setting, a path);
its message already names the file, line, key or field. The CLIs print it as one line and exit
with status 2; every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

T = TypeVar("T")


class UserError(ValueError):
    """Bad input: a file, a setting or a path the user gave. A ValueError, so callers that
    catch ValueError keep working."""


# File system errors are the user's too: a path that is missing, a file where a directory
# belongs, no permission. Their message names the path.
USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)


def one_line(e: BaseException) -> str:
    """The exception's message on one line (a multi-line message keeps its words)."""
    return " ".join(str(e).split()) or type(e).__name__


def report_user_errors(main: Callable[..., T], *, extra: tuple[type[BaseException], ...] = ()) -> Callable[..., T]:
    """Wraps a CLI's main: a user error (or one of `extra`) becomes `error: MESSAGE` on stderr
    and exit status 2; anything else propagates with its traceback."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except USER_ERRORS + extra as e:
            print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    return wrapped
