"""The one exception type the CLI turns into a single stderr line and exit code 2, and how messages name options.

Library messages name an option by its Python name between marks, `‹max_size›`. They read as `max_size`
(the keyword of the Python API) unless the CLI renders them as its flags (`--max-size`) with `option_names`:
only the CLI knows flag names.
"""

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_OPTION = re.compile(r"‹([a-z][a-z0-9_]*)›")
_namer: ContextVar[Callable[[str], str] | None] = ContextVar("option_namer", default=None)


def terms(text: str) -> str:
    """`text` with each marked option `‹name›` written as the caller's interface names it (see module doc)."""
    namer = _namer.get()
    return _OPTION.sub(lambda m: namer(m.group(1)) if namer else m.group(1), text)


@contextmanager
def option_names(namer: Callable[[str], str]) -> Iterator[None]:
    """Inside the block, messages name options by `namer(python_name)` (the CLI passes its flag names)."""
    token = _namer.set(namer)
    try:
        yield
    finally:
        _namer.reset(token)


class UserError(Exception):
    """Bad input from the user: a missing file, an impossible target, a mismatch.

    The message is one line, written for the person who ran the command; options in it are marked
    `‹name›` and read in the caller's terms (`terms`).
    """

    def __str__(self) -> str:
        return terms(super().__str__())


class SharedUserError(UserError):
    """A UserError that every process of a torchrun job raises together; rank 0 alone reports it."""


def launcher_rank() -> int | None:
    """The RANK a launcher such as torchrun gave this process when it started several (None otherwise)."""
    import os

    try:
        return int(os.environ["RANK"]) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    except (KeyError, ValueError):
        return None


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM, raised by the CLI's signal handlers; `signum` says which (exit code 128 + signum).

    Not a KeyboardInterrupt, so no library in between turns it into something else, and a KeyboardInterrupt
    raised by code the user pointed us at (a model factory) is told apart from the user's keyboard."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
