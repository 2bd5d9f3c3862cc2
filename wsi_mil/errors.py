"""One exception hierarchy. Every message says what went wrong *and* what to do.

The CLI maps :class:`WsiMilError` (and subclasses) to exit code 2 with a single
line on stderr; anything else is a bug and shows a traceback only with ``--debug``.
"""

from __future__ import annotations


class WsiMilError(Exception):
    """Base class: a problem the user can fix (bad input, bad config)."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(self.__str__())

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ConfigError(WsiMilError):
    """Invalid option, option combination or config file."""


class SlideError(WsiMilError):
    """A slide cannot be opened or read (missing, corrupt, unsupported)."""


class StoreError(WsiMilError):
    """A patch store, feature store or run folder is missing, incomplete or inconsistent."""


class DataError(WsiMilError):
    """Training/prediction data is unusable (bad labels, NaN features, mixed dims)."""


class NotImplementedYet(WsiMilError):
    """A command that exists in the CLI surface but is not built yet."""
