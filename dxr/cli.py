"""The error path every ``python -m dxr.<command>`` shares.

An expected failure — bad input the user can fix: a missing or foreign file, a setting out of range,
an image the command cannot take — is one line on stderr, ``<prog>: error: <message>``, and exit
status 2 (as argparse does for a bad flag). Ctrl-C is ``<prog>: interrupted`` and status 130. Anything
else is a bug and keeps its traceback.

Commands raise :class:`CommandError` (or ``ValueError``, which every validation in dxr raises with
the argument's name) for the first kind; ``run`` turns it into the line.
"""

from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence

# OSErrors that mean "this path is not what the command needs", never a bug of the command
PATH_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


class CommandError(ValueError):
    """Input a command cannot work with; the message names the argument or file and what was expected."""


def one_line(err: BaseException) -> str:
    """The error's message on one line (an OSError with a filename says which file)."""
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in str(err.strerror or ""):
        text = f"{err.filename}: {err.strerror or err}"
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


def run(main: Callable[[Optional[Sequence[str]]], Optional[int]], argv: Optional[Sequence[str]] = None, *,
        prog: str) -> int:
    """Call ``main(argv)`` and return its exit status: 0 (or what it returned), 2 for an expected
    failure (one line on stderr), 130 on Ctrl-C."""
    try:
        status = main(argv)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (ValueError,) + PATH_ERRORS as err:
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)
    return int(status or 0)


__all__ = ["CommandError", "PATH_ERRORS", "one_line", "run"]
