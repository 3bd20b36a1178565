"""Safetensors shards read where they lie on the Hub: the header, then each tensor's bytes, by HTTP range requests.

A streamed base needs no local copy: `lora_cli.hub` registers a `RemoteShard` under the path the shard would have
in the Hugging Face cache, and the readers (`read_header`, `read_tensor`, `ShardWriter.copy_tensors`) ask
`remote_shard(path)` before opening a file. Requests go through huggingface_hub's own HTTP session, headers
(token, user agent) and endpoint, against one commit (the URL names the commit sha, so a branch moving mid-merge
cannot mix revisions). A dropped connection is resumed from the byte it stopped at; after `MAX_RETRIES` tries
without progress, the read fails with an InputError naming the file, and the atomic writer leaves nothing behind.

This module imports nothing heavy: huggingface_hub is imported only when a shard is actually read.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from lora_cli.errors import InputError

# The first request of a shard asks for this much, enough for most headers (a 7B shard's header is ~30 KB).
HEADER_GUESS = 256 * 1024
MAX_RETRIES = 5
RETRY_WAIT_S = 1.0

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

    def __init__(self, path: Path, repo_id: str, filename: str, commit: str, size: int) -> None:
        self.path = Path(path)  # where it would sit in the cache; the key readers look it up by
        self.repo_id, self.filename, self.commit, self.size = repo_id, filename, commit, size
        self.requests = 0  # range requests made, for tests and the benchmark
        self.retries = 0
        self._header: tuple[bytes, int] | None = None

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

    def pieces(self, offset: int, nbytes: int) -> Iterator[bytes]:
        """The bytes [offset, offset + nbytes) in pieces as the network delivers them (tens of KB: what a copy
        holds in memory at once), resumed after a dropped connection from the first byte not yet yielded."""
        from huggingface_hub import constants, hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        if offset < 0 or offset + nbytes > self.size:
            raise self._corrupt(f"a read of bytes {offset}..{offset + nbytes} lies outside its {self.size} bytes")
        url = hf_hub_url(self.repo_id, self.filename, revision=self.commit, endpoint=constants.ENDPOINT)
        done, failures = 0, 0
        while done < nbytes:
            start = offset + done
            headers = build_hf_headers()
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
                        if done >= nbytes:
                            break
                if done < nbytes:
                    raise _ShortRead
            except InputError:
                raise
            except Exception as exc:
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
