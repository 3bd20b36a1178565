"""User-facing errors: each names the file at fault and what to do about it.

Library code raises these; the CLI turns them into one line on stderr and exit code 2.
"""

from __future__ import annotations

from pathlib import Path

EXIT_OK = 0
EXIT_DIFFERENT = 1
EXIT_USER_ERROR = 2


class LoraCtlError(Exception):
    """An error the user can fix: bad input, a refused operation, a missing file."""

    def __init__(self, message: str, *, path: str | Path | None = None, fix: str | None = None) -> None:
        self.message = message
        self.path = str(path) if path is not None else None
        self.fix = fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        head = f"{self.path}: {self.message}" if self.path else self.message
        return f"{head} ({self.fix})" if self.fix else head


class InputError(LoraCtlError):
    """A file we were given is missing, unreadable, corrupt or of the wrong kind."""


class SwappedArgumentsError(InputError):
    """An adapter folder was given where a model checkpoint goes; each command says where it belongs."""


class AdapterMismatchError(LoraCtlError):
    """The adapter does not fit the base checkpoint it is applied to."""


class OutputError(LoraCtlError):
    """The output location cannot be used (exists, inside an input, no space, read-only)."""


class NonFiniteError(LoraCtlError):
    """A merged tensor holds NaN or Inf; the adapter is broken for this base."""


class NotRevertibleError(LoraCtlError):
    """An edit cannot be undone from the merged checkpoint alone."""


class UnsupportedAdapterError(LoraCtlError):
    """An adapter type or feature loractl does not merge."""
