"""How the commands fail: a user error (bad value, missing file...) ends with one ``error: ...`` line that
names the flag and the fix, and exit code 1; a bug keeps its traceback.

Standard library only (see the package docstring).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import traceback
from collections.abc import Callable, Iterator


class CLIError(Exception):
    """A user error detected by the command line itself (its message says what to do)."""


USER_ERRORS = (CLIError, ValueError, OSError, ImportError, MemoryError)
"""Errors caused by what the user asked for (bad value, missing file...): one line, no traceback."""
USER_ERROR_NAMES = frozenset({"HubPushError", "OutOfMemoryError"})
"""Same, for classes defined in modules the CLI must not import at start-up (matched by class name)."""


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` comes from the user's input (shown as one line) rather than from a bug."""
    return isinstance(err, USER_ERRORS) or any(cls.__name__ in USER_ERROR_NAMES for cls in type(err).__mro__)


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (its class name when it has none)."""
    return " ".join(str(err).split()) or type(err).__name__


@contextlib.contextmanager
def about_flag(flag: str, wording: dict[str, str] | None = None) -> Iterator[None]:
    """Re-raise the API's ``ValueError`` / ``OSError`` as a :class:`CLIError` that names ``flag``.

    The API's messages name its arguments (``overwrite=True``); ``wording`` rewrites them as flags
    (``--overwrite``), and the flag is put first unless the rewritten message already names it.
    """
    try:
        yield
    except (ValueError, OSError) as err:
        message = one_line(err)
        for api, cli in (wording or {}).items():
            message = message.replace(api, cli)
        raise CLIError(message if flag in message else f"{flag}: {message}") from err


def run_guarded(action: Callable[[argparse.Namespace], None], args: argparse.Namespace) -> None:
    """Run ``action(args)``: user errors exit 1 with one ``error: ...`` line on stderr (the traceback only
    with ``--verbose``); bugs keep their traceback; Ctrl-C exits 130."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.verbose:
        logging.getLogger("optimum_maiht").setLevel(logging.INFO)
    try:
        action(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as err:
        if not is_user_error(err):
            raise
        if args.verbose:
            traceback.print_exc()
        print(f"error: {one_line(err)}", file=sys.stderr)
        raise SystemExit(1) from None
