"""The one exception type the CLI turns into a single stderr line and exit code 2."""


class UserError(Exception):
    """Bad input from the user: a missing file, an impossible target, a mismatch.

    The message is one line, written for the person who ran the command.
    """


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
