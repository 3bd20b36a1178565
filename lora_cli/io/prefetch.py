"""Read-ahead for a cold input: ask the kernel for the byte ranges the pipeline needs next, a window ahead.

The pipeline reads one tensor at a time (and copies untouched ones with copy_file_range), so on a checkpoint
that is not in the page cache each read waits for the disk with a shallow queue, and the disk idles while a
tensor is computed. `posix_fadvise(WILLNEED)` starts the reads of the next ranges in the background, into the
page cache (file-backed memory, reclaimable: no anonymous memory is added). On a cached input it is a lookup.
A shard streamed from the Hub has no page cache to warm: its ranges go to `RemoteReadAhead` (lora_cli/io/remote.py),
which fetches them a bounded window ahead of the readers, several requests at once.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lora_cli.io.files import SourceFile
from lora_cli.io.remote import RemoteReadAhead, RemoteShard, remote_shard

# How far ahead of the reader the kernel is asked to read, and the largest single request (a long run of
# untouched tensors is one range; asked for in pieces, the window moves smoothly).
PREFETCH_WINDOW = 512 * 1024 * 1024
PREFETCH_PIECE = 64 * 1024 * 1024


class Prefetcher:
    """`advance(i)` when the reader starts range i: ranges up to `window` bytes beyond it are asked for, in order,
    by one background thread. A no-op where the OS has no posix_fadvise."""

    def __init__(self, ranges: list[tuple[SourceFile | Path, int, int]], window: int = PREFETCH_WINDOW) -> None:
        streamed: list[tuple[RemoteShard, int, int]] = []
        local: list[tuple[SourceFile | Path, int, int]] = []
        for source, offset, nbytes in ranges:
            shard = None if isinstance(source, SourceFile) else remote_shard(source)
            if shard is not None:
                streamed.append((shard, offset, nbytes))
            local.append((source, offset, nbytes if shard is None else 0))  # indices stay those of `ranges`
        # Started now: the first blocks are on their way before the pipeline asks for them.
        self.remote = RemoteReadAhead(streamed) if streamed else None
        self.pieces: list[tuple[SourceFile | Path, int, int]] = []
        self.first_piece: list[int] = []  # index of each range's first piece
        self.starts: list[int] = []  # bytes of input before each piece
        total = 0
        for path, offset, nbytes in local:
            self.first_piece.append(len(self.pieces))
            for begin in range(offset, offset + nbytes, PREFETCH_PIECE):
                size = min(PREFETCH_PIECE, offset + nbytes - begin)
                self.pieces.append((path, begin, size))
                self.starts.append(total)
                total += size
        self.window = window
        self.asked = 0
        self.enabled = hasattr(os, "posix_fadvise") and bool(self.pieces)
        self._fds: dict[Path, int] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loractl-prefetch") if self.enabled else None

    def advance(self, index: int) -> None:
        if self._pool is None or index >= len(self.first_piece):
            return
        piece = self.first_piece[index]
        if piece >= len(self.pieces):
            return
        limit = self.starts[piece] + self.window
        while self.asked < len(self.pieces) and self.starts[self.asked] < limit:
            self._pool.submit(self._advise, self.pieces[self.asked])
            self.asked += 1

    def _advise(self, piece: tuple[SourceFile | Path, int, int]) -> None:
        source, offset, nbytes = piece
        with contextlib.suppress(OSError):  # only a hint: a file that cannot be opened is read (and named) later
            if isinstance(source, SourceFile):
                fd = source.fd  # the descriptor the reader reads through (`io/files.py`)
            else:
                fd = self._fds.get(source)
                if fd is None:
                    # Only regular files: opening a FIFO by path would block this thread.
                    fd = self._fds[source] = os.open(source, os.O_RDONLY | os.O_NONBLOCK)
            os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        if self.remote is not None:
            self.remote.close()
            self.remote = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
