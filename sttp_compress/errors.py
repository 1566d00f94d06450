"""The one exception type the CLI turns into a single stderr line and exit code 2."""


class UserError(Exception):
    """Bad input from the user: a missing file, an impossible target, a mismatch.

    The message is one line, written for the person who ran the command.
    """
