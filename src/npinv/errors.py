"""The one exception type for errors a user can cause (bad file, unknown model, bad option), and the one
mapping of OS errors (a full disk, a read-only folder, ...) to the line a user reads."""

from __future__ import annotations

import errno as _errno


class NpinvError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits with code 2."""


# -- OS errors: one mapping from errno to the words a user reads -------------------------------------
_OS_REASONS = {
    _errno.ENOSPC: "no space left on device",
    _errno.EDQUOT: "disk quota exceeded",
    _errno.EFBIG: "file too large for this file system",
    _errno.EACCES: "permission denied",
    _errno.EPERM: "operation not permitted",
    _errno.EROFS: "read-only file system",
    _errno.ENAMETOOLONG: "file name too long",
    _errno.EISDIR: "it is a folder",
    _errno.ENOTDIR: "a part of the path is not a folder",
    _errno.ENOENT: "no such file or folder",
    _errno.EEXIST: "it already exists",
    _errno.EIO: "input/output error (a failing disk or network share?)",
    _errno.EMFILE: "too many open files",
    _errno.ENFILE: "too many open files on this system",
    _errno.ELOOP: "too many symbolic links",
    _errno.EBUSY: "device or resource busy",
    _errno.ETXTBSY: "file busy",
    _errno.EXDEV: "cannot move across file systems",
    _errno.ESTALE: "stale network file handle",
}


def os_error_reason(exc: OSError) -> str | None:
    """The words for ``exc``'s errno, or None for an OS error npinv does not know."""
    return _OS_REASONS.get(exc.errno) if exc.errno is not None else None


def os_error_words(exc: OSError) -> str:
    """The reason for a known errno, else the error's own words: its ``strerror``, or its message
    (Pillow's ``OSError("encoder error -2 when writing image file")`` has no errno)."""
    reason = os_error_reason(exc)
    if reason is not None:
        return reason
    if exc.strerror:
        return str(exc.strerror)
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def user_os_error_line(exc: OSError) -> str | None:
    """The CLI's line for an OS error that reached it: :func:`os_error_line` for a known errno; for
    another (or none) the error's own words when it names a file (the user's input or output), else
    None (not the user's doing: an internal error)."""
    line = os_error_line(exc)
    if line is None and exc.filename is not None:
        line = f"cannot use {exc.filename}: {os_error_words(exc)}"
    return line


def os_error_line(exc: OSError, path: object = None, action: str | None = None) -> str | None:
    """``cannot write out.png: no space left on device``: one line for an OS error with a known errno
    (``path`` and ``action`` default to the exception's file name and "use"); None for others."""
    reason = os_error_reason(exc)
    if reason is None:
        return None
    target = path if path is not None else exc.filename
    if target is None:
        return reason if action is None else f"cannot {action}: {reason}"
    return f"cannot {action or 'use'} {target}: {reason}"


class FileError(NpinvError, OSError):
    """An OS error while reading or writing a named file, as a user-facing error: still an ``OSError``
    (``errno`` kept) for Python callers, one line and exit 2 for the CLI."""

    def __init__(self, message: str, errno: int | None = None, filename: object = None) -> None:
        super().__init__(message)
        self.errno = errno
        self.filename = filename

    def __str__(self) -> str:
        return str(self.args[0])

    @classmethod
    def wrap(cls, exc: OSError, path: object, action: str = "write") -> FileError:
        """``exc`` as a :class:`FileError` naming ``path``: its errno's reason, or for an unknown errno
        (or none) the error's own words; the error concerns the user's file either way."""
        return cls(f"cannot {action} {path}: {os_error_words(exc)}", exc.errno, str(path))
