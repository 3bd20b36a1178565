"""Every failure becomes one line on stderr and an exit code a CI job can gate on; tracebacks only with --debug.

With --json the same error is also printed on stdout as one JSON object (error, file, fix, exit_code), so a job
that parses stdout gets a result even when the command fails.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import typer

from lora_cli.cli import _signals
from lora_cli.cli._signals import EXIT_INTERRUPTED
from lora_cli.errors import EXIT_USER_ERROR, LoraCtlError

EXIT_INTERNAL = 3
__all__ = ["EXIT_INTERNAL", "EXIT_INTERRUPTED", "user_errors"]


def _sigterm(signum: int, frame: object) -> None:
    # Unwind like Ctrl-C so that `atomic_directory` removes the half-written output.
    raise KeyboardInterrupt


@contextmanager
def user_errors(
    debug: bool = False, *, json_output: bool = False, out: str | None = None, done: str = "the command had finished"
) -> Iterator[None]:
    """Map errors raised by the work inside to one line (and a JSON object with --json) and an exit code.

    `out` is the folder the command writes: an interruption that lands after it appeared (renamed into place
    whole) says that it is complete instead of claiming nothing was written. `done` says what is true once the
    work inside has completed, for an interruption after it.
    """
    before = _identity(out)
    if out is not None:
        done = f"{out} is complete"
    phases = _signals.installed()
    previous = None
    if phases:
        _signals.work_started()
    else:
        previous = signal.signal(signal.SIGTERM, _sigterm)
    completed = False
    try:
        yield
        completed = True
    except typer.Exit:
        raise
    except LoraCtlError as exc:
        if debug:
            raise
        _fail(exc.message, EXIT_USER_ERROR, json_output, file=exc.path, fix=exc.fix, line=exc.one_line())
    except KeyboardInterrupt:
        after = _identity(out)
        if after is not None and after != before:  # the atomic rename had happened: OUT is whole
            _fail(f"interrupted after the work was done: {out} is complete", EXIT_INTERRUPTED, json_output)
        _fail("interrupted: no partial output was left behind", EXIT_INTERRUPTED, json_output)
    except OSError as exc:
        if debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        message = str(exc.strerror or exc)
        _fail(message, EXIT_USER_ERROR, json_output, file=exc.filename, line=f"{where}{message}")
    except Exception as exc:
        if debug:
            raise
        message = f"{type(exc).__name__}: {exc}"
        fix = "run again with --debug and report it"
        _fail(message, EXIT_INTERNAL, json_output, fix=fix, line=f"internal error: {message} ({fix})")
    finally:
        if phases:
            _signals.work_done(done if completed else "the error above was reported")
        elif previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _identity(path: str | None) -> tuple[int, int] | None:
    """(device, inode) of `path`, None when absent: a new identity means a new folder was renamed into place."""
    try:
        stat = os.stat(path) if path is not None else None
    except OSError:
        return None
    return None if stat is None else (stat.st_dev, stat.st_ino)


def _fail(
    message: str,
    code: int,
    json_output: bool,
    *,
    file: object = None,
    fix: str | None = None,
    line: str | None = None,
) -> None:
    text = line or message
    prefix = "" if code == EXIT_INTERRUPTED or text.startswith("internal error") else "error: "
    sys.stderr.write((prefix + text).replace("\n", " ") + "\n")
    if json_output:
        record = {"error": message, "file": None if file is None else str(file), "fix": fix, "exit_code": code}
        sys.stdout.write(json.dumps(record) + "\n")
    raise typer.Exit(code)
