"""Every failure becomes one line on stderr and an exit code a CI job can gate on; tracebacks only with --debug."""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import typer

from lora_cli.errors import EXIT_USER_ERROR, LoraCtlError

EXIT_INTERRUPTED = 130
EXIT_INTERNAL = 3


def _sigterm(signum: int, frame: object) -> None:
    # Unwind like Ctrl-C so that `atomic_directory` removes the half-written output.
    raise KeyboardInterrupt


@contextmanager
def user_errors(debug: bool = False) -> Iterator[None]:
    previous = signal.signal(signal.SIGTERM, _sigterm)
    try:
        yield
    except typer.Exit:
        raise
    except LoraCtlError as exc:
        if debug:
            raise
        _fail(f"error: {exc.one_line()}", EXIT_USER_ERROR)
    except KeyboardInterrupt:
        _fail("interrupted: no partial output was left behind", EXIT_INTERRUPTED)
    except OSError as exc:
        if debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        _fail(f"error: {where}{exc.strerror or exc}", EXIT_USER_ERROR)
    except Exception as exc:
        if debug:
            raise
        _fail(f"internal error: {type(exc).__name__}: {exc} (run again with --debug and report it)", EXIT_INTERNAL)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fail(message: str, code: int) -> None:
    sys.stderr.write(message.replace("\n", " ") + "\n")
    raise typer.Exit(code)
