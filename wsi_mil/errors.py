"""One exception hierarchy. Every message says what went wrong *and* what to do.

The CLI maps :class:`WsiMilError` (and subclasses) to exit code 2 with a single
line on stderr, and so an OSError about a path (:func:`path_error`: an output folder
that cannot be made or written); anything else is a bug and shows a traceback only
with ``--debug``.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path


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


# ---------------------------------------------------------------- output paths
#: errnos of an OSError about a path the user chose: a folder that cannot be made or
#: written (a file in the way, no permission, read-only, full disk, name too long, ...)
PATH_ERRNOS = frozenset(
    {
        errno.ENOENT,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.EEXIST,
        errno.EACCES,
        errno.EPERM,
        errno.EROFS,
        errno.ENOSPC,
        errno.EDQUOT,
        errno.ENAMETOOLONG,
        errno.ELOOP,
    }
)

#: errnos that are about the file system, not one path: reported even without a file name
_DISK_ERRNOS = frozenset({errno.EROFS, errno.ENOSPC, errno.EDQUOT})

#: the output paths each command writes, named in the fix of a path error
OUTPUT_PATHS = {
    "synth": "OUT folder",
    "tile": "--work",
    "extract": "--work / --features",
    "train": "--run / --work",
    "predict": "--out-dir / --run / --work",
    "heatmap": "--run / --work",
    "run": "config's work / run / out-dir",
}


def output_hint(what: str | None) -> str:
    """The fix of a path error: ``check the <what> path and its permissions``."""
    return f"check the {what or 'output'} path and its permissions"


def cannot_write(path: str | os.PathLike, reason: str, hint: str) -> ConfigError:
    """``cannot create/write PATH: REASON (HINT)``, naming a file that stands where a folder
    is needed (the usual cause of 'Not a directory')."""
    msg = f"cannot create/write {os.fsdecode(path)}: {reason}"
    blocker = _file_in_the_way(Path(path))
    if blocker is not None:
        msg += f"; {blocker} is a file, not a folder"
    return ConfigError(msg, hint)


def _file_in_the_way(path: Path) -> Path | None:
    for p in (path, *path.parents):
        try:
            if p.exists():
                return None if p.is_dir() else p
        except OSError:
            continue
    return None


def path_error(e: BaseException, hint: str) -> ConfigError | None:
    """The one-line user error of an OSError about a path (see :data:`PATH_ERRNOS`), or
    None for any other exception, which stays an internal error."""
    if not isinstance(e, OSError) or e.errno not in PATH_ERRNOS:
        return None
    reason = e.strerror or os.strerror(e.errno)
    if e.filename is None:
        if e.errno not in _DISK_ERRNOS:
            return None
        return ConfigError(f"cannot write the output: {reason}", hint)
    return cannot_write(e.filename, reason, hint)
