"""Start reading a cold base checkpoint while the CLI is still importing torch (no torch here, no lora_cli imports).

`loractl merge BASE ...` spends about 3 s importing torch (a CUDA build of it) before the first byte of BASE is
read, and on an input that is not in the page cache the disk idles all that time. When the command line names a
local BASE folder, a daemon thread asks the kernel to read its shards ahead (posix_fadvise WILLNEED: into the page
cache, file-backed and reclaimable, no anonymous memory), up to a cap that stays well inside the free memory.
On a cached input this is a quick lookup; anything unexpected (no such folder, no fadvise) makes it a no-op.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from pathlib import Path

COMMANDS = ("merge", "unmerge")
CAP_BYTES = 6 * 1024**3  # about what a disk reads in the import's 3-4 s; the pipeline's own read-ahead goes on
PIECE = 64 * 1024 * 1024


def _available_bytes() -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _base_folder(argv: list[str]) -> Path | None:
    """BASE of `loractl merge|unmerge BASE ...` when it is a local folder (options before BASE are not looked at)."""
    command = Path(argv[0]).name if argv else ""
    if command not in ("-m", "loractl", "__main__.py") or len(argv) < 3 or argv[1] not in COMMANDS:
        return None
    folder = Path(argv[2])
    return folder if folder.is_dir() else None


def _read_ahead(files: list[Path], cap: int) -> None:
    left = cap
    for path in files:
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block this thread
            try:
                size = os.fstat(fd).st_size
                for offset in range(0, size, PIECE):
                    if left <= 0:
                        return
                    length = min(PIECE, size - offset, left)
                    os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
                    left -= length
            finally:
                os.close(fd)


def start(argv: list[str] | None = None) -> threading.Thread | None:
    """Begin reading BASE's shards in the background, if the command line is a merge of a local folder."""
    folder = _base_folder(sys.argv if argv is None else argv)
    if folder is None or not hasattr(os, "posix_fadvise"):
        return None
    cap = min(CAP_BYTES, _available_bytes() // 4)
    files = sorted(folder.glob("*.safetensors"))
    if cap <= 0 or not files:
        return None
    thread = threading.Thread(target=_read_ahead, args=(files, cap), name="loractl-early-reads", daemon=True)
    thread.start()
    return thread
