"""An output folder that appears whole or not at all: written beside its final place, renamed at the end."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lora_cli.errors import OutputError
from lora_cli.filenames import ADAPTER_CONFIG, CONFIG, PROVENANCE_FILE

TMP_MARKER = ".loractl-tmp-"


# The longest OUT name whose hidden sibling can carry the whole name; longer names are shortened there.
TMP_NAME_ROOM = 40


def check_output(out: Path, inputs: list[Path], *, overwrite: bool, needed_bytes: int) -> None:
    """Refuse an output that would clobber, nest inside an input, not be writable, or not fit on the disk."""
    out = Path(out).expanduser()
    # First: any look at a name longer than the filesystem allows fails with ENAMETOOLONG.
    name_max = _name_max(out.parent)
    if len(os.fsencode(out.name)) > name_max:
        raise OutputError(
            f"its name is {len(os.fsencode(out.name))} bytes long; this filesystem allows {name_max}",
            path=out,
            fix="choose a shorter name for OUT",
        )
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
    if out.exists():
        _check_replaceable(out)
    parent = resolved.parent
    if not parent.is_dir():
        raise _missing_parent(out, parent)
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


def _check_replaceable(out: Path) -> None:
    """--overwrite replaces an empty folder or loractl's own output (it holds PROVENANCE_FILE), nothing else: a
    forgotten OUT makes the last input the output (`merge base lora lora2 --overwrite`)."""
    entries = sorted(p.name for p in out.iterdir())
    if not entries or (out / PROVENANCE_FILE).is_file():
        return
    kind = (
        "a PEFT adapter"
        if ADAPTER_CONFIG in entries
        else "a model that loractl did not write"
        if CONFIG in entries or any(n.endswith(".safetensors") for n in entries)
        else "files that loractl did not write"
    )
    shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
    raise OutputError(
        f"holds {kind} ({shown}) and no {PROVENANCE_FILE}: did you forget OUT?",
        path=out,
        fix="--overwrite replaces only an empty folder or loractl's own output; pass a new folder as OUT",
    )


def _missing_parent(out: Path, parent: Path) -> OutputError:
    """Name the real obstacle: a missing folder, or a file where a folder should be."""
    existing = next((p for p in (parent, *parent.parents) if os.path.lexists(p)), None)
    if existing is not None and existing.exists() and not existing.is_dir():
        return OutputError(f"{existing} is a file, not a folder", path=out, fix="choose another OUT")
    return OutputError(f"parent folder {parent} does not exist", path=out, fix="create it first")


def _name_max(parent: Path) -> int:
    """The longest file name the filesystem holding `parent` (or its nearest existing ancestor) takes."""
    for folder in (parent, *parent.parents):
        try:
            return os.pathconf(folder, "PC_NAME_MAX")
        except (OSError, ValueError):
            continue
    return 255


def _umask() -> int:
    """The process's umask (os.umask can only be read by setting it; this runs before any worker thread)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_directory(out: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling of `out`; on success move it into place, on any failure remove it.

    The sibling's name is chosen before it is made, so that Ctrl-C or SIGTERM landing at any point (even just
    after `mkdir` returns) finds it in the cleanup; an old OUT moved aside is put back if the swap is cut short.
    """
    out = Path(out).expanduser().resolve()
    # The hidden name adds to OUT's: a long OUT name is shortened there, so that the sibling can be made at all.
    stem = out.name if len(os.fsencode(out.name)) <= _name_max(out.parent) - TMP_NAME_ROOM else out.name[:32]
    tmp = out.parent / f".{stem}{TMP_MARKER}{secrets.token_hex(8)}"
    trash = out.parent / f".{stem}.loractl-old-{secrets.token_hex(8)}"
    try:
        os.mkdir(tmp, 0o700)
        yield tmp
        # OUT gets the mode any new folder gets (0777 less the umask), not the sibling's private 0700.
        os.chmod(tmp, 0o777 & ~_umask())
        _fsync_dir(tmp)
        if out.exists():
            if not overwrite:
                raise OutputError("appeared while writing", path=out, fix="pass --overwrite or choose another OUT")
            # Move the old folder aside first so that OUT is never missing or half-replaced.
            os.mkdir(trash, 0o700)
            os.rename(out, trash / "old")
            os.rename(tmp, out)
        else:
            os.rename(tmp, out)
        _fsync_dir(out.parent)
    except BaseException as exc:
        if not (isinstance(exc, FileExistsError) and exc.filename == str(tmp)):
            shutil.rmtree(tmp, ignore_errors=True)
        if os.path.lexists(trash / "old") and not os.path.lexists(out):
            os.rename(trash / "old", out)
        raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def _cannot_create_in(parent: Path) -> str | None:
    """Why a folder cannot be created in `parent`, found by trying: `os.access` says yes to root on a read-only
    mount or a pseudo-filesystem, and the failure would otherwise only show after the plan was built."""
    probe = parent / f"{TMP_MARKER}probe-{secrets.token_hex(8)}"
    try:
        os.mkdir(probe, 0o700)
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    finally:
        # Also when Ctrl-C lands just after mkdir: the name was known before.
        with contextlib.suppress(OSError):
            os.rmdir(probe)
    return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new(path: Path, data: bytes) -> None:
    """Create `path` and write `data`, refusing to follow or reuse anything already there: every file of an
    output is new, so nothing is ever written through a link that points at an input."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def replace_with(path: Path, data: bytes) -> None:
    """Give `path` new content by writing a new file beside it and renaming it over: never through the old one."""
    fresh = path.with_name(f".{path.name}{TMP_MARKER}new")
    write_new(fresh, data)
    os.replace(fresh, path)
