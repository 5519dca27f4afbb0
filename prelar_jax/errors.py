"""A marker for errors caused by the user's input (config, data, workdir, environment).

Command-line entry points print these as one message without a traceback and exit with status 2;
anything else is a bug and keeps its traceback. A full disk (``ENOSPC``, ``EDQUOT``) is treated the
same way wherever it happens (metrics, media, replay files), since it is the machine's state, not
a bug: every file a resumed run relies on is written atomically, so re-running resumes cleanly.
"""

import errno
import sys
from typing import Callable, NoReturn, TypeVar

T = TypeVar("T")

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class UserError(Exception):
    """Mixed into every error class whose message tells the user what to change."""


def disk_full_message(error: OSError) -> str:
    """What to tell the user about an ``OSError`` that says the disk (or quota) is full."""
    where = f" while writing {error.filename}" if error.filename else ""
    return (
        f"the disk is full{where} ({error.strerror}). Free disk space or use a --workdir on another disk, "
        "then re-run the same command: it resumes from the latest finished checkpoint."
    )


def _exit(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def exit_on_user_error(function: Callable[[], T]) -> T:
    """Runs ``function``; a ``UserError`` or a full disk becomes ``error: <message>`` on stderr
    and exit status 2, everything else propagates with its traceback."""
    try:
        return function()
    except UserError as error:
        _exit(str(error))
    except OSError as error:
        if error.errno not in _DISK_FULL:
            raise
        _exit(disk_full_message(error))
