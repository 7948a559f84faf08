"""Entry-point plumbing shared by train.py, sample.py and prepare.py: user errors end as one line, not a
traceback.

A user error is an exception whose message already names the fix (bad path, bad option, refused checkpoint).
It is logged as one line and the process exits with status 2. Anything else is a bug and keeps its traceback.
Set ``LDM_TRACEBACK=1`` to see the traceback of a user error too.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger("ldm")

F = TypeVar("F", bound=Callable[..., Any])

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, KeyError, OSError)
EXIT_USER_ERROR = 2


class UserError(Exception):
    """A refused input or state whose message names the fix; always reported as one line."""


def one_line(exc: BaseException) -> str:
    """``Kind: message`` on one line (OSError keeps its errno name, e.g. ENOSPC, so the cause is visible)."""
    text = " ".join(str(exc).split()) or repr(exc)
    if isinstance(exc, OSError) and exc.errno in errno.errorcode and errno.errorcode[exc.errno] not in text:
        text = f"{errno.errorcode[exc.errno]}: {text}"
    if isinstance(exc, KeyError) and len(exc.args) == 1:
        text = " ".join(str(exc.args[0]).split())
    return f"{type(exc).__name__}: {text}"


def exit_on_user_error(main: F) -> F:
    """Wraps an entry point's ``main``: a user error is logged as one line and exits 2; SystemExit passes."""

    @functools.wraps(main)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except (UserError, *USER_ERRORS) as exc:
            if os.environ.get("LDM_TRACEBACK") == "1":
                raise
            log.error("%s", one_line(exc))
            sys.exit(EXIT_USER_ERROR)

    return wrapped  # type: ignore[return-value]
