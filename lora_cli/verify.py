"""`--verify`: prove that what reached the disk is what was meant, and leave a manifest a later job can check.

While writing, the writer records a CRC-32 of every tensor's bytes: the bytes it wrote for computed tensors, the
source byte range for copied ones (copied kernel-side, so never seen otherwise). After the shards are synced,
their pages are dropped from the page cache and each file is read back: its header must list the planned
tensors, and every tensor's bytes must match the recorded checksum. The same pass computes each file's SHA-256
for `SHA256SUMS`, written last, in `sha256sum` format, so `sha256sum -c SHA256SUMS` or `loractl verify OUT`
checks the artifact anywhere. CRC-32 (about twice SHA-256's speed here) is enough for the per-tensor
comparison, which guards against torn or misplaced writes, not against an adversary; the manifest uses SHA-256.
"""

from __future__ import annotations

import hashlib
import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from lora_cli.errors import InputError, OutputError
from lora_cli.filenames import MANIFEST
from lora_cli.io.safetensors_file import read_header

CHUNK = 16 * 1024 * 1024


class TensorDigests:
    """CRC-32 of each tensor as written, keyed by (file name, tensor name). Filled by the writer thread only."""

    def __init__(self) -> None:
        self.expected: dict[tuple[str, str], int] = {}

    def record_bytes(self, file: str, name: str, data: memoryview | bytes) -> None:
        self.expected[(file, name)] = zlib.crc32(data)

    def record_range(self, file: str, tensors: list[tuple[str, int]], source: Path, offset: int) -> None:
        """Checksums of tensors stored back to back in `source` from `offset`, as (name, nbytes) in order."""
        with open(source, "rb", buffering=0) as handle:
            for name, nbytes in tensors:
                self.expected[(file, name)] = _crc_of_range(handle.fileno(), offset, nbytes, source)
                offset += nbytes


@dataclass
class VerifyReport:
    """What `--verify` (or `loractl verify`) checked."""

    tensors: int
    files: int
    seconds: float
    manifest: str | None = None
    sha256: dict[str, str] = field(default_factory=dict)


def _crc_of_range(fd: int, offset: int, nbytes: int, path: Path) -> int:
    crc, done = 0, 0
    while done < nbytes:
        chunk = os.pread(fd, min(CHUNK, nbytes - done), offset + done)
        if not chunk:
            raise InputError("ended while its bytes were being checksummed", path=path, fix="was it changed meanwhile?")
        crc = zlib.crc32(chunk, crc)
        done += len(chunk)
    return crc


def _drop_cache(fd: int) -> None:
    """Evict the (synced, clean) pages so the re-read comes from the device, not from what we just wrote."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def verify_shard(path: Path, planned: list[tuple[str, str, tuple[int, ...]]], digests: TensorDigests) -> str:
    """Re-read one written shard: its header lists `planned` (name, dtype, shape) in order, and every tensor's
    bytes match the checksum recorded while writing. Returns the file's SHA-256."""
    header = read_header(path)
    found = [(t.name, t.dtype, t.shape) for t in header.tensors.values()]
    if found != planned:
        raise OutputError("was written with another header than planned", path=path, fix="report this bug")
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as handle:
        fd = handle.fileno()
        _drop_cache(fd)
        head = os.pread(fd, header.data_start, 0)
        digest.update(head)
        for info in header.tensors.values():
            crc, done = 0, 0
            while done < info.nbytes:
                chunk = os.pread(fd, min(CHUNK, info.nbytes - done), info.offset + done)
                if not chunk:
                    raise OutputError(f"ends inside tensor {info.name}", path=path, fix="check the disk")
                crc = zlib.crc32(chunk, crc)
                digest.update(chunk)
                done += len(chunk)
            if crc != digests.expected.get((path.name, info.name)):
                raise OutputError(
                    f"tensor {info.name} reads back different bytes than were written",
                    path=path,
                    fix="the disk or filesystem corrupted the write; check it and run again",
                )
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path, known: dict[str, str]) -> str:
    """SHA256SUMS over every file in `directory` (reusing hashes already computed), written last."""
    lines = []
    for path in sorted(directory.iterdir()):
        if path.name == MANIFEST or not path.is_file():
            continue
        lines.append(f"{known.get(path.name) or sha256_file(path)}  {path.name}\n")
    (directory / MANIFEST).write_text("".join(lines))
    return MANIFEST


def verify_written(
    directory: Path, shards: list[tuple[str, list[tuple[str, str, tuple[int, ...]]]]], digests: TensorDigests
) -> VerifyReport:
    """Check every written shard (file name, planned tensors) and write the manifest over the whole folder."""
    started = time.perf_counter()
    hashes = {name: verify_shard(directory / name, planned, digests) for name, planned in shards}
    manifest = write_manifest(directory, hashes)
    return VerifyReport(
        tensors=sum(len(planned) for _, planned in shards),
        files=len(shards),
        seconds=time.perf_counter() - started,
        manifest=manifest,
        sha256=hashes,
    )


def check_manifest(directory: Path) -> VerifyReport:
    """`loractl verify OUT`: every file in SHA256SUMS is present with its hash, and every shard's header is valid."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise InputError(f"has no {MANIFEST}", path=directory, fix="it was not written with --verify; nothing to check")
    started = time.perf_counter()
    expected: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or Path(name).name != name:
            raise InputError(f"line {number} is not `SHA256  NAME`", path=path, fix="restore the manifest")
        expected[name] = digest
    tensors = 0
    for name, digest in expected.items():
        file = directory / name
        if not file.is_file():
            raise InputError(f"{name} is missing", path=directory, fix="the artifact is incomplete; copy it again")
        if sha256_file(file) != digest:
            raise InputError(f"does not match its SHA-256 in {MANIFEST}", path=file, fix="copy it again")
        if name.endswith(".safetensors"):
            tensors += len(read_header(file).tensors)
    extra = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name not in expected and p.name != MANIFEST)
    if extra:
        raise InputError(
            f"holds files the manifest does not list: {', '.join(extra[:3])}",
            path=directory,
            fix="remove them, or merge again with --verify",
        )
    files = sum(1 for name in expected if name.endswith(".safetensors"))
    return VerifyReport(
        tensors=tensors, files=files, seconds=time.perf_counter() - started, manifest=MANIFEST, sha256=expected
    )
