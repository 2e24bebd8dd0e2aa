"""The errors maskdiff raises for a user's mistake: the ``maskdiff`` command prints each in one line, no traceback.

Any ``ValueError`` (and ``FileNotFoundError``, ``PermissionError``, a parse error of the command line) is reported
that way by :func:`maskdiff.tools.main.main`; :class:`UserError` adds a hint line, and :class:`CheckpointError` says
that a file given as a checkpoint cannot be read as one.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake the user can fix (a config value, a path, a checkpoint, data, an argument).

    The ``maskdiff`` command prints ``maskdiff: error: <message>``, then ``hint: <hint>`` when there is one, and
    exits with code 2.

    Args:
        message: what is wrong, naming the value, option or file.
        hint: one line on how to put it right, or ``None``.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class CheckpointError(UserError):
    """A file given as a checkpoint that cannot be read as one (empty, text, truncated, another format), or whose
    contents do not fit what it was given for."""
