"""Input files opened once and by type: a regular file, or one clear refusal (never a hang on a FIFO or a device).

A `SourceFile` owns one open descriptor, and every read of that input goes through it: a file renamed over the
path while loractl works cannot mix two files' bytes into one output. `check_unchanged` then proves, before an
output appears, that the path still names the same file, unmodified (device, inode, size, modification time).
"""

from __future__ import annotations

import os
import stat
import weakref
from pathlib import Path

from lora_cli.errors import InputError

MISSING_FIX = "check the path, or download the file again"


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def not_regular(path: Path, mode: int) -> InputError:
    kind = _kind(mode)
    what = kind if kind.startswith("not") else f"is {kind}, not a regular file"
    return InputError(what, path=path, fix="replace it with the real file; loractl reads regular files only")


def _open_error(exc: OSError, path: Path, missing_fix: str) -> InputError:
    if isinstance(exc, FileNotFoundError):
        return InputError("file not found", path=path, fix=missing_fix)
    if isinstance(exc, PermissionError):
        return InputError("permission denied", path=path, fix="make the file readable")
    return InputError(f"cannot be opened ({exc.strerror or exc})", path=path, fix=missing_fix)


def check_regular(path: Path, *, missing_fix: str = MISSING_FIX) -> os.stat_result:
    """`path`'s status (symlinks followed), refusing anything that is not a regular file before it is opened."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise _open_error(exc, Path(path), missing_fix) from None
    if not stat.S_ISREG(info.st_mode):
        raise not_regular(Path(path), info.st_mode)
    return info


def open_regular(path: Path, *, missing_fix: str = MISSING_FIX) -> int:
    """A read-only descriptor of `path`, which must be a regular file.

    The type is checked before opening, and again on the descriptor: the path may be swapped for a FIFO in
    between, and O_NONBLOCK keeps such an open from waiting for a writer that never comes.
    """
    path = Path(path)
    check_regular(path, missing_fix=missing_fix)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise _open_error(exc, path, missing_fix) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise not_regular(path, mode)
    os.set_blocking(fd, True)
    return fd


def read_regular(path: Path, *, missing_fix: str = MISSING_FIX) -> bytes:
    """The whole content of a small regular file (a config, an index, a manifest)."""
    fd = open_regular(path, missing_fix=missing_fix)
    try:
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read()
    finally:
        os.close(fd)


def _identity(info: os.stat_result) -> tuple[int, int, int, int]:
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


class SourceFile:
    """One input file opened once: reads go through its descriptor only, and it can prove it did not change.

    The descriptor is closed by `close()` (or the context manager), or when the object is collected.
    """

    def __init__(self, path: Path, *, missing_fix: str = MISSING_FIX) -> None:
        self.path = Path(path)
        self._fd: int | None = open_regular(self.path, missing_fix=missing_fix)
        self.identity = _identity(os.fstat(self._fd))
        self._finalizer = weakref.finalize(self, os.close, self._fd)

    @property
    def fd(self) -> int:
        if self._fd is None:
            raise ValueError(f"{self.path} was closed")
        return self._fd

    @property
    def size(self) -> int:
        return self.identity[2]

    def close(self) -> None:
        self._fd = None
        self._finalizer()

    def __enter__(self) -> SourceFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def changed(self) -> str | None:
        """How the file differs from when it was opened (rewritten in place, or another file at its path)."""
        if self._fd is not None and _identity(os.fstat(self._fd)) != self.identity:
            return "was modified"
        try:
            now = _identity(os.stat(self.path))
        except OSError:
            return "was removed"
        return None if now == self.identity else "was replaced"

    def check_unchanged(self) -> None:
        problem = self.changed()
        if problem is not None:
            raise InputError(
                f"{problem} while loractl was reading it; the output would mix two versions, so none was written",
                path=self.path,
                fix="leave the inputs alone while loractl runs, then run it again",
            )
