"""Safetensors shards read where they lie on the Hub: the header, then each tensor's bytes, by HTTP range requests.

A streamed base needs no local copy: `lora_cli.hub` registers a `RemoteShard` under the path the shard would have
in the Hugging Face cache, and the readers (`read_header`, `read_tensor`, `ShardWriter.copy_tensors`) ask
`remote_shard(path)` before opening a file. Requests go through huggingface_hub's own HTTP session, headers
(token, user agent) and endpoint, against one commit (the URL names the commit sha, so a branch moving mid-merge
cannot mix revisions). The file is resolved once (`get_hf_file_metadata`, as `hf_hub_download` does) and its final
location reused for every range, without the token when it lies on another host (a signed CDN link, as
huggingface_hub does); a link refused later (expired) is resolved again. A dropped connection is resumed from the
byte it stopped at; after `MAX_RETRIES` tries without progress, the read fails with an InputError naming the file,
and the atomic writer leaves nothing behind.

`RemoteReadAhead` fetches the byte ranges a pipeline will read, in order, in blocks of at most `READ_AHEAD_BLOCK`
bytes (adjacent tensors share a block: one request for many small ones), `READ_AHEAD_REQUESTS` at a time, never more
than `READ_AHEAD_WINDOW` bytes fetched and not yet consumed: memory stays flat while the network is kept busy ahead
of the compute. Readers of a shard being read ahead take their bytes from its blocks.

This module imports nothing heavy: huggingface_hub is imported only when a shard is actually read.
"""

from __future__ import annotations

import bisect
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

from lora_cli.errors import InputError

# The first request of a shard asks for this much, enough for most headers (a 7B shard's header is ~30 KB).
HEADER_GUESS = 256 * 1024
MAX_RETRIES = 5
RETRY_WAIT_S = 1.0
# Read-ahead: bytes fetched (or being fetched) and not yet consumed, at most; the largest single range request; how
# many requests are in flight at once. 32 MiB keeps four 4 MiB requests busy twice over (on the real Hub each range
# waits a round trip before its first byte) and adds little to the merge's flat memory.
READ_AHEAD_WINDOW = 32 * 1024 * 1024
READ_AHEAD_BLOCK = 4 * 1024 * 1024
READ_AHEAD_REQUESTS = 4

_registry: dict[Path, RemoteShard] = {}
_lock = threading.Lock()


def remote_shard(path: Path) -> RemoteShard | None:
    """The remote shard registered for `path`, or None for a local file."""
    return _registry.get(Path(path)) if _registry else None


def remote_shards_in(directory: Path) -> list[Path]:
    """Paths of the remote shards registered inside `directory`, sorted."""
    directory = Path(directory)
    return sorted(path for path in list(_registry) if path.parent == directory)


def register(shard: RemoteShard) -> None:
    with _lock:
        _registry[shard.path] = shard


class RemoteShard:
    """One safetensors file of a Hub repo at one commit, read by byte range."""

    def __init__(
        self, path: Path, repo_id: str, filename: str, commit: str, size: int, location: str | None = None
    ) -> None:
        self.path = Path(path)  # where it would sit in the cache; the key readers look it up by
        self.repo_id, self.filename, self.commit, self.size = repo_id, filename, commit, size
        # Where the file's bytes are (`HfFileMetadata.location`): the resolve URL, or where it redirects to.
        self.location = location
        self.requests = 0  # range requests made, for tests and the benchmark
        self.retries = 0
        self._header: tuple[bytes, int] | None = None
        self._ahead: RemoteReadAhead | None = None  # set while a read-ahead holds this shard's next bytes

    @property
    def where(self) -> str:
        return f"{self.repo_id}@{self.commit[:12]}/{self.filename}"

    def header(self) -> tuple[bytes, int]:
        """(the JSON header's bytes, the file size), checked as `read_header` checks a local file's."""
        if self._header is None:
            from lora_cli.io.safetensors_file import MAX_HEADER_BYTES

            head = self.read(0, min(HEADER_GUESS, self.size)) if self.size >= 8 else b""
            if len(head) < 8:
                raise self._corrupt(f"{self.size} bytes is too short for a header")
            (length,) = struct.unpack("<Q", head[:8])
            if length > MAX_HEADER_BYTES:
                raise self._corrupt(f"header claims {length} bytes (more than the 100 MB limit)")
            if 8 + length > self.size:
                raise self._corrupt(f"header claims {length} bytes but the file has {self.size}")
            raw = head[8 : 8 + length]
            if len(raw) < length:
                raw += self.read(len(head), length - len(raw))
            self._header = (raw, self.size)
        return self._header

    def read(self, offset: int, nbytes: int) -> bytes:
        buffer = bytearray(nbytes)
        self.read_into(memoryview(buffer), offset)
        return bytes(buffer)

    def read_into(self, view: memoryview, offset: int) -> None:
        """Fill `view` with the bytes from `offset`."""
        done = 0
        for piece in self.pieces(offset, len(view)):
            view[done : done + len(piece)] = piece
            done += len(piece)

    def pieces(self, offset: int, nbytes: int) -> Iterator[bytes | memoryview]:
        """The bytes [offset, offset + nbytes) in pieces: from the read-ahead's blocks where it holds them, else as
        the network delivers them (tens of KB: what a copy holds in memory at once)."""
        if offset < 0 or offset + nbytes > self.size:
            raise self._corrupt(f"a read of bytes {offset}..{offset + nbytes} lies outside its {self.size} bytes")
        ahead = self._ahead
        if ahead is not None:
            yield from ahead.pieces(self, offset, nbytes)
        else:
            yield from self.fetch(offset, nbytes)

    def _resolve_url(self) -> str:
        from huggingface_hub import constants, hf_hub_url

        return hf_hub_url(self.repo_id, self.filename, revision=self.commit, endpoint=constants.ENDPOINT)

    def _relocate(self) -> bool:
        """Resolve the file again (a signed link expires); False when that gives the link that was just refused."""
        from huggingface_hub import get_hf_file_metadata

        refused = self.location
        self.location = get_hf_file_metadata(self._resolve_url()).location
        return self.location != refused

    def fetch(self, offset: int, nbytes: int, cancelled: threading.Event | None = None) -> Iterator[bytes | memoryview]:
        """The bytes [offset, offset + nbytes) from the network, in pieces as it delivers them, resumed after a
        dropped connection from the first byte not yet yielded. Stops quietly once `cancelled` is set."""
        from huggingface_hub.errors import HfHubHTTPError
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        resolve = self._resolve_url()
        done, failures, relocated = 0, 0, False
        while done < nbytes:
            if cancelled is not None and cancelled.is_set():
                return
            start = offset + done
            url = self.location or resolve
            headers = build_hf_headers()
            if _origin(url) != _origin(resolve):
                # A signed link on another host (the Hub's CDN): the token stays on the Hub, as huggingface_hub does.
                headers.pop("authorization", None)
            headers["Range"] = f"bytes={start}-{offset + nbytes - 1}"
            progressed = False
            try:
                self.requests += 1
                with get_session().stream("GET", url, headers=headers, follow_redirects=True) as response:
                    hf_raise_for_status(response)
                    if response.status_code != 206:
                        raise InputError(
                            f"the server ignored a byte-range request (HTTP {response.status_code})",
                            path=self.where,
                            fix="pass --download to fetch the base into the cache first",
                        )
                    # As received: a piece buffered up to a fixed size would be lost with the connection.
                    for piece in response.iter_bytes():
                        piece = piece[: nbytes - done]
                        if piece:
                            done += len(piece)
                            progressed = True
                            yield piece
                        if done >= nbytes or (cancelled is not None and cancelled.is_set()):
                            break
                if done < nbytes and not (cancelled is not None and cancelled.is_set()):
                    raise _ShortRead
            except InputError:
                raise
            except Exception as exc:
                if (
                    isinstance(exc, HfHubHTTPError)
                    and self.location not in (None, resolve)
                    and _status(exc) in (401, 403, 404, 410)
                ):
                    # The reused link was refused (a signed link expires): resolve the file again, once; refused
                    # again, go back to the resolve URL with the token, its redirect followed for every range.
                    if not relocated:
                        relocated = True
                        try:
                            if self._relocate():
                                continue
                        except Exception as again:
                            raise _map_error(again, self.where) from again
                    self.location = None
                    continue
                if not _transient(exc):
                    raise _map_error(exc, self.where) from exc
                failures = 0 if progressed else failures + 1
                self.retries += 1
                if failures >= MAX_RETRIES:
                    raise InputError(
                        f"the connection kept dropping while streaming bytes {start}..{offset + nbytes} "
                        f"({MAX_RETRIES} tries without progress)",
                        path=self.where,
                        fix="check the network and re-run, or pass --download to fetch the base into the cache",
                    ) from exc
                time.sleep(RETRY_WAIT_S * failures)

    def _corrupt(self, what: str) -> InputError:
        return InputError(
            f"not a valid safetensors file: {what}",
            path=self.where,
            fix="the file on the Hub is corrupt or not safetensors; report it to the repo owner",
        )


class _Block:
    """Bytes [start, end) of one shard, fetched by one range request; dropped once every byte was consumed."""

    __slots__ = ("end", "future", "pooled", "readers", "released", "remaining", "shard", "start")

    def __init__(self, shard: RemoteShard, start: int, end: int, pooled: bool = False) -> None:
        self.shard, self.start, self.end = shard, start, end
        self.pooled = pooled  # part of one large range, read by one reader: its buffer is reused once read
        self.remaining = end - start
        self.future: Future[bytearray] | None = None
        self.released = False
        self.readers = 0  # reads holding a view of its bytes now: its buffer is reused only once none does


class RemoteReadAhead:
    """Fetches planned byte ranges of remote shards ahead of their readers (see the module's docstring).

    `ranges` are (shard, offset, nbytes) in the order they will be read; adjacent ones are fetched together. Each
    byte of them must be read once (through the shard's `pieces`/`read_into`): a block is dropped when its last
    byte was, and the window moves on. Bytes outside them, or read twice, are fetched directly.
    """

    def __init__(
        self,
        ranges: list[tuple[RemoteShard, int, int]],
        window: int = READ_AHEAD_WINDOW,
        block: int = READ_AHEAD_BLOCK,
        requests: int = READ_AHEAD_REQUESTS,
    ) -> None:
        self.window = window
        self._by_shard: dict[RemoteShard, list[_Block]] = {}  # each shard's blocks by offset, for lookup
        # Small ranges back to back are packed into one block (one request for many norms); a large range gets
        # blocks of its own, so that a block never waits on a reader of another range: the read stage consumes
        # the edited tensors while the write stage, some tensors behind, copies the untouched ones.
        packs: list[list] = []  # [shard, start, end, packable]
        for shard, offset, nbytes in ranges:
            if nbytes <= 0:
                continue
            last = packs[-1] if packs else None
            if (
                nbytes < block
                and last
                and last[3]
                and last[0] is shard
                and last[2] == offset
                and last[2] - last[1] + nbytes <= block
            ):
                last[2] += nbytes
            elif nbytes < block:
                packs.append([shard, offset, offset + nbytes, True])
            else:
                stop = offset + nbytes
                packs.extend([shard, b, min(b + block, stop), False] for b in range(offset, stop, block))
        blocks = [_Block(shard, start, end, not packable) for shard, start, end, packable in packs]
        for block_ in sorted(blocks, key=lambda b: (id(b.shard), b.start)):
            owned = self._by_shard.setdefault(block_.shard, [])
            if owned and block_.start < owned[-1].end:
                block_.released = True  # bytes planned twice: a second reading of them goes to the network
                continue
            owned.append(block_)
        self._blocks = [b for b in blocks if not b.released]
        self._starts = {shard: [b.start for b in owned] for shard, owned in self._by_shard.items()}
        self._lock = threading.Lock()
        self._cancelled = threading.Event()
        self._held = 0  # bytes of blocks fetched or in flight, not yet consumed
        self._next = 0  # the next block to ask for, in reading order
        self._requests = requests
        self._block_size = block
        self._spare: list[bytearray] = []  # buffers of read blocks, reused by the next large blocks
        self._pool = ThreadPoolExecutor(max_workers=requests, thread_name_prefix="loractl-remote")
        for shard in self._by_shard:
            shard._ahead = self
        with self._lock:
            self._top_up()

    def _top_up(self) -> None:
        """Ask for the next blocks while the window has room (the caller holds the lock)."""
        while self._next < len(self._blocks) and not self._cancelled.is_set():
            block = self._blocks[self._next]
            size = block.end - block.start
            if block.future is None and self._held and self._held + size > self.window:
                return
            self._next += 1
            if block.future is None and not block.released:
                self._submit(block)

    def _submit(self, block: _Block) -> None:
        self._held += block.end - block.start
        block.future = self._pool.submit(self._fetch, block)

    def _fetch(self, block: _Block) -> bytearray:
        size = block.end - block.start
        if block.pooled:
            with self._lock:
                data = self._spare.pop() if self._spare else bytearray(self._block_size)
        else:
            data = bytearray(size)
        view, done = memoryview(data), 0
        for piece in block.shard.fetch(block.start, size, self._cancelled):
            view[done : done + len(piece)] = piece
            done += len(piece)
        if done < size:  # closed meanwhile: nobody reads it
            raise RuntimeError(f"read-ahead of {block.shard.where} was closed")
        return data

    def _find(self, shard: RemoteShard, position: int) -> tuple[_Block | None, int]:
        """The planned block holding `position`, or (None, where the bytes not held by a block end)."""
        owned, starts = self._by_shard.get(shard, []), self._starts.get(shard, [])
        k = bisect.bisect_right(starts, position) - 1
        if k >= 0 and position < owned[k].end:
            # A block already consumed holds nothing now: a second reading goes to the network.
            return (None, owned[k].end) if owned[k].released else (owned[k], owned[k].end)
        return None, starts[k + 1] if k + 1 < len(starts) else shard.size

    def pieces(self, shard: RemoteShard, offset: int, nbytes: int) -> Iterator[bytes | memoryview]:
        position, end = offset, offset + nbytes
        while position < end:
            with self._lock:
                block, until = self._find(shard, position)
                if block is not None and block.future is None:
                    # Wanted before the window reached it (a reader ahead of a slower one): asked for now, with
                    # the next blocks of this read, so that they too arrive in parallel.
                    self._submit(block)
                    self._submit_within(shard, block.end, end)
                if block is not None:
                    block.readers += 1
            if block is None:
                stop = min(end, until)
                yield from shard.fetch(position, stop - position)
                position = stop
                continue
            assert block.future is not None
            data = block.future.result()
            stop = min(end, block.end)
            yield memoryview(data)[position - block.start : stop - block.start]
            self._consumed(block, stop - position)
            position = stop

    def _submit_within(self, shard: RemoteShard, position: int, end: int) -> None:
        """Ask for the blocks of [position, end) not asked for yet, up to one per request slot (the lock is held)."""
        for _ in range(self._requests - 1):
            if position >= end:
                return
            block, until = self._find(shard, position)
            if block is None:
                return
            if block.future is None:
                self._submit(block)
            position = until

    def _consumed(self, block: _Block, nbytes: int) -> None:
        """A read is done with `nbytes` of `block` (it asked for its next piece); the last byte releases it."""
        with self._lock:
            block.readers -= 1
            block.remaining -= nbytes
            if block.remaining <= 0 and not block.released:
                block.released = True  # found no more: a later reading of its bytes goes to the network
                self._held -= block.end - block.start
                self._top_up()
            if block.released and block.readers == 0 and block.future is not None:
                future, block.future = block.future, None
                if block.pooled and future.done() and future.exception() is None:
                    # Reused, not freed: 8 MiB buffers freed by one thread and allocated by another left the
                    # allocator's arenas holding well over the window (measured: +140 MiB on the 1.1B merge).
                    self._spare.append(future.result())

    def close(self) -> None:
        """Stop fetching (requests in flight stop at their next piece) and let go of the shards."""
        self._cancelled.set()
        for shard in self._by_shard:
            if shard._ahead is self:
                shard._ahead = None
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> RemoteReadAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port


def _status(exc: BaseException) -> int | None:
    return getattr(getattr(exc, "response", None), "status_code", None)


class _ShortRead(Exception):
    """The server closed the body before sending every byte it promised."""


def _transient(exc: BaseException) -> bool:
    """A dropped or timed-out connection, or a 5xx: worth resuming. Client errors (401, 403, 404) are not."""
    import httpx2 as httpx  # huggingface_hub 2.x's HTTP client
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, _ShortRead | httpx.TransportError):
        return True
    if isinstance(exc, HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        return status is not None and (status >= 500 or status == 429)
    return False


def _map_error(exc: BaseException, where: str) -> InputError:
    from huggingface_hub.errors import HfHubHTTPError

    status = getattr(getattr(exc, "response", None), "status_code", None) if isinstance(exc, HfHubHTTPError) else None
    if status in (401, 403):
        return InputError(
            f"the Hub refused access with HTTP {status} while streaming",
            path=where,
            fix="log in with `hf auth login` or set HF_TOKEN, and accept the model's terms if it is gated",
        )
    if status == 404:
        return InputError("the Hub has no such file at this commit", path=where, fix="check the repo and --revision")
    return InputError(f"streaming failed: {exc}", path=where, fix="re-run, or pass --download")
