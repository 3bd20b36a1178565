"""Ctrl-C (and SIGTERM) in three phases: before the work, during it, and after it.

Before the work (start-up: parsing, importing torch and transformers) nothing has been written, so the handler
writes one line and leaves at once with os._exit: no KeyboardInterrupt is raised inside an import, where a bare
`except:` in a library could swallow it (the command then ran anyway) or C++ code called through pybind11 could
turn it into an abort. During the work a KeyboardInterrupt unwinds the stack, so that `atomic_directory` removes
the half-written output and `user_errors` reports it. After the work, the output is complete: say so.
Installed by the entry point before anything else is imported; stdlib only, so that it costs nothing.
"""

from __future__ import annotations

import os
import signal
from types import FrameType
from typing import Any

EXIT_INTERRUPTED = 130
_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_done_message = "interrupted: nothing was written"
_installed = False  # only the entry point installs the phases; a test driving the app keeps its own handlers
_ignored: set[int] = set()  # signals ignored when we started (a background job's SIGINT): they stay ignored


def installed() -> bool:
    return _installed


def _exit_now(signum: int, frame: FrameType | None) -> None:
    # os.write, not print: a handler may run while sys.stderr's buffer is mid-write.
    os.write(2, (_done_message + "\n").encode())
    os._exit(EXIT_INTERRUPTED)


def _unwind(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _set(handler: Any) -> None:
    for sig in _SIGNALS:
        if sig not in _ignored:
            signal.signal(sig, handler)


def install_start_up() -> None:
    """Phase 1: an interruption now exits 130 with one line, whatever is being imported."""
    global _done_message, _installed
    _done_message = "interrupted: nothing was written"
    _installed = True
    _ignored.update(sig for sig in _SIGNALS if signal.getsignal(sig) == signal.SIG_IGN)
    _set(_exit_now)


def work_started() -> None:
    """Phase 2: an interruption unwinds (KeyboardInterrupt) so that partial output is removed."""
    _set(_unwind)


def work_done(message: str) -> None:
    """Phase 3: the work is complete; an interruption now exits 130 saying so (`message`)."""
    global _done_message
    _done_message = f"interrupted after the work was done: {message}"
    _set(_exit_now)


def shutting_down() -> None:
    """The command has returned and said so: ignore the signals while the interpreter shuts down.

    Python puts back the default action of the signals it handled while it finalizes (a second or more once
    torch is loaded), when a Ctrl-C would kill the process with no word (exit -2) after a complete, reported
    run; ignored, it leaves the exit code of the finished command. SIG_IGN holds for every thread (a signal mask
    would hold for this one only, and torch's threads would take the signal).
    """
    if _installed:
        _set(signal.SIG_IGN)
