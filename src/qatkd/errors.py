"""User-facing errors.

Anything a user can cause (a bad path, key, value or checkpoint) is raised as `QatkdError` with a
one-line message that names the problem and the fix. The CLI prints it without a traceback.
"""

from __future__ import annotations


class QatkdError(Exception):
    """An error caused by the user's input; its message is shown as-is, on one line."""


def first_line(e: BaseException) -> str:
    """The first line of a library's exception message, or the exception's type where it has
    none: what a one-line `QatkdError` quotes of the cause."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
