"""A marker for errors caused by the user's input (config, data, workdir, environment).

Command-line entry points print these as one message without a traceback and exit with status 2;
anything else is a bug and keeps its traceback.
"""

import sys
from typing import Callable, TypeVar

T = TypeVar("T")


class UserError(Exception):
    """Mixed into every error class whose message tells the user what to change."""


def exit_on_user_error(function: Callable[[], T]) -> T:
    try:
        return function()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
