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
import re
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from lora_cli.errors import InputError, OutputError
from lora_cli.filenames import MANIFEST
from lora_cli.io.atomic import write_new
from lora_cli.io.files import SourceFile, read_regular
from lora_cli.io.safetensors_file import read_header

CHUNK = 16 * 1024 * 1024


class TensorDigests:
    """CRC-32 of each tensor as written, keyed by (file name, tensor name). Filled by the writer thread only."""

    def __init__(self) -> None:
        self.expected: dict[tuple[str, str], int] = {}

    def record_bytes(self, file: str, name: str, data: memoryview | bytes) -> None:
        self.expected[(file, name)] = zlib.crc32(data)

    def record_range(self, file: str, tensors: list[tuple[str, int]], source: SourceFile, offset: int) -> None:
        """Checksums of tensors stored back to back in `source` from `offset`, as (name, nbytes) in order.

        Read through the descriptor the copy used: the checksum is of the bytes that were copied."""
        for name, nbytes in tensors:
            self.expected[(file, name)] = _crc_of_range(source.fd, offset, nbytes, source.path)
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
    with read_header(path) as header:
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
    with SourceFile(path) as source, os.fdopen(os.dup(source.fd), "rb", buffering=0) as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path, known: dict[str, str]) -> str:
    """SHA256SUMS over every file in `directory` (reusing hashes already computed), written last. Files of `known`
    no longer on disk (shards pushed to the Hub and removed) are listed with their known hash."""
    names = {p.name for p in directory.iterdir() if p.is_file() and p.name != MANIFEST} | set(known)
    lines = [f"{known.get(name) or sha256_file(directory / name)}  {name}\n" for name in sorted(names)]
    write_new(directory / MANIFEST, "".join(lines).encode())
    return MANIFEST


def verify_written(
    directory: Path,
    shards: list[tuple[str, list[tuple[str, str, tuple[int, ...]]]]],
    digests: TensorDigests,
    verified: dict[str, str] | None = None,
) -> VerifyReport:
    """Check every written shard (file name, planned tensors) not `verified` already (name -> SHA-256) and write
    the manifest over the whole folder."""
    started = time.perf_counter()
    verified = verified or {}
    hashes = {name: verified.get(name) or verify_shard(directory / name, planned, digests) for name, planned in shards}
    manifest = write_manifest(directory, hashes)
    return VerifyReport(
        tensors=sum(len(planned) for _, planned in shards),
        files=len(shards),
        seconds=time.perf_counter() - started,
        manifest=manifest,
        sha256=hashes,
    )


# `sha256sum -c` reads GNU lines ("HASH  NAME", or "HASH *NAME" in binary mode, a leading backslash when the
# name is escaped) and BSD-tag lines ("SHA256 (NAME) = HASH"), digests in either case, and skips "#" comments.
_GNU_LINE = re.compile(r"(\\?)([0-9a-fA-F]{64}) [ *](.+)")
_TAG_LINE = re.compile(r"(\\?)SHA256 \((.+)\) = ([0-9a-fA-F]{64})")


def _unescape(name: str) -> str:
    """sha256sum's escaping of names holding a newline or a backslash (the line then starts with a backslash)."""
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "r": "\r", "\\": "\\"}.get(m.group(1), m.group(0)), name)


def parse_manifest(path: Path) -> dict[str, str]:
    """SHA256SUMS as `sha256sum -c` reads it: relative file name -> lower-case digest. Stricter in two ways:
    a line it would skip as improperly formatted is an error, and no name may lead outside the folder."""
    try:
        text = read_regular(path).decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(
            "is not UTF-8 text", path=path, fix="restore the manifest (merge again with --verify)"
        ) from None
    expected: dict[str, str] = {}
    for number, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line and number == text.count("\n") + 1:
            break  # the end of the last line
        if line.startswith("#"):
            continue
        gnu, tag = _GNU_LINE.fullmatch(line), _TAG_LINE.fullmatch(line)
        if gnu is not None:
            escaped, digest, name = gnu.groups()
        elif tag is not None:
            escaped, name, digest = tag.groups()
        else:
            raise InputError(
                f"line {number} is not `SHA256  NAME` (as sha256sum writes it)", path=path, fix="restore the manifest"
            )
        name = _unescape(name) if escaped else name
        parts = PurePosixPath(name).parts
        if not parts or PurePosixPath(name).is_absolute() or ".." in parts:
            raise InputError(f"line {number} names {name!r}, outside the folder", path=path, fix="restore the manifest")
        name = str(PurePosixPath(*parts))
        if name in expected:
            raise InputError(f"lists {name} twice", path=path, fix="restore the manifest")
        expected[name] = digest.lower()
    if not expected:
        raise InputError("lists no files", path=path, fix="restore the manifest (merge again with --verify)")
    return expected


def _unlisted(directory: Path, expected: dict[str, str]) -> list[str]:
    """Every entry below `directory` (subfolders included, links not followed) that the manifest does not cover."""
    extra = []
    for folder, dirnames, filenames in os.walk(directory):
        for name in sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(folder, d))]):
            rel = Path(folder, name).relative_to(directory).as_posix()
            if rel != MANIFEST and rel not in expected:
                extra.append(rel)
    return sorted(extra)


def check_manifest(directory: Path) -> VerifyReport:
    """`loractl verify OUT`: every file in SHA256SUMS is present with its hash, every shard's header is valid, and
    every file in OUT (subfolders included) is listed."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not os.path.lexists(path):
        raise InputError(f"has no {MANIFEST}", path=directory, fix="it was not written with --verify; nothing to check")
    started = time.perf_counter()
    expected = parse_manifest(path)
    extra = _unlisted(directory, expected)
    if extra:
        raise InputError(
            f"holds files the manifest does not list: {', '.join(extra[:3])}",
            path=directory,
            fix="remove them, or merge again with --verify",
        )
    tensors = 0
    for name, digest in expected.items():
        file = directory / name
        if not os.path.lexists(file):
            raise InputError(f"{name} is missing", path=directory, fix="the artifact is incomplete; copy it again")
        if sha256_file(file) != digest:
            raise InputError(f"does not match its SHA-256 in {MANIFEST}", path=file, fix="copy it again")
        if name.endswith(".safetensors"):
            with read_header(file) as header:
                tensors += len(header.tensors)
    files = sum(1 for name in expected if name.endswith(".safetensors"))
    return VerifyReport(
        tensors=tensors, files=files, seconds=time.perf_counter() - started, manifest=MANIFEST, sha256=expected
    )
