"""An output folder that appears whole or not at all: written beside its final place, renamed at the end."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lora_cli.errors import OutputError

TMP_MARKER = ".loractl-tmp-"


def check_output(out: Path, inputs: list[Path], *, overwrite: bool, needed_bytes: int) -> None:
    """Refuse an output that would clobber, nest inside an input, not be writable, or not fit on the disk."""
    out = Path(out).expanduser()
    resolved = out.resolve()
    for source in inputs:
        source = source.resolve()
        if resolved == source or source in resolved.parents:
            raise OutputError(f"is inside the input {source}", path=out, fix="choose an OUT outside the inputs")
        if resolved in source.parents:
            raise OutputError(f"contains the input {source}", path=out, fix="choose another OUT")
    if out.is_symlink():
        raise OutputError("is a symbolic link", path=out, fix="pass a real path for OUT")
    if out.exists() and not overwrite:
        raise OutputError("already exists", path=out, fix="pass --overwrite to replace it, or choose another OUT")
    if out.exists() and not out.is_dir():
        raise OutputError("exists and is not a folder", path=out, fix="choose another OUT")
    parent = resolved.parent
    if not parent.is_dir():
        raise OutputError(f"parent folder {parent} does not exist", path=out, fix="create it first")
    problem = _cannot_create_in(parent)
    if problem:
        raise OutputError(
            f"parent folder {parent} is not writable ({problem})", path=out, fix="choose a writable location"
        )
    free = shutil.disk_usage(parent).free
    if free < needed_bytes:
        raise OutputError(
            f"needs {needed_bytes / 2**30:.2f} GiB but {parent} has {free / 2**30:.2f} GiB free",
            path=out,
            fix="free disk space or choose another OUT",
        )


@contextmanager
def atomic_directory(out: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling of `out`; on success move it into place, on any failure remove it."""
    out = Path(out).expanduser().resolve()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_MARKER}", dir=out.parent))
    try:
        yield tmp
        _fsync_dir(tmp)
        if out.exists():
            if not overwrite:
                raise OutputError("appeared while writing", path=out, fix="pass --overwrite or choose another OUT")
            # Move the old folder aside first so that OUT is never missing or half-replaced.
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.loractl-old-", dir=out.parent))
            os.rename(out, trash / "old")
            os.rename(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _cannot_create_in(parent: Path) -> str | None:
    """Why a folder cannot be created in `parent`, found by trying: `os.access` says yes to root on a read-only
    mount or a pseudo-filesystem, and the failure would otherwise only show after the plan was built."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f"{TMP_MARKER}probe-", dir=parent))
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
