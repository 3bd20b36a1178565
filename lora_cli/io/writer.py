"""Write safetensors shards one tensor at a time.

A safetensors header lists every tensor's name, dtype, shape and byte range. All of that is known before any
tensor is computed, so each shard's header is written first and tensors follow in order: nothing larger than
one tensor is ever held in memory, unlike writers that buffer a whole shard.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lora_cli.errors import OutputError
from lora_cli.filenames import INDEX_FILE, SINGLE_FILE
from lora_cli.io.atomic import write_new
from lora_cli.io.dtypes import TORCH_TO_SAFETENSORS, itemsize
from lora_cli.io.files import SourceFile
from lora_cli.io.remote import remote_shard

if TYPE_CHECKING:
    from lora_cli.verify import TensorDigests

COPY_CHUNK = 64 * 1024 * 1024


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


@dataclass
class ShardPlan:
    filename: str
    tensors: list[OutputTensor] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def header_bytes(tensors: list[OutputTensor], metadata: dict[str, str]) -> bytes:
    """The header of a shard holding `tensors` in order, padded to 8 bytes as the reference writer does."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for tensor in tensors:
        header[tensor.name] = {
            "dtype": tensor.dtype,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def plan_shards(tensors: list[OutputTensor], source_shards: list[str], max_shard_bytes: int | None) -> list[ShardPlan]:
    """Keep the source's shard of each tensor, or re-shard greedily under `max_shard_bytes`.

    `source_shards[i]` is the source file name of `tensors[i]`; tensors stay in the given order.
    """
    if max_shard_bytes is None:
        plans: dict[str, ShardPlan] = {}
        for tensor, shard in zip(tensors, source_shards, strict=True):
            plans.setdefault(shard, ShardPlan(shard)).tensors.append(tensor)
        return list(plans.values())
    groups: list[list[OutputTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if groups[-1] and size + tensor.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += tensor.nbytes
    if len(groups) == 1:
        return [ShardPlan(SINGLE_FILE, groups[0])]
    count = len(groups)
    return [ShardPlan(f"model-{i + 1:05d}-of-{count:05d}.safetensors", group) for i, group in enumerate(groups)]


def write_index(directory: Path, shards: list[ShardPlan], extra_metadata: dict[str, object] | None = None) -> None:
    """model.safetensors.index.json as transformers writes it, for checkpoints of more than one file."""
    weight_map = {t.name: shard.filename for shard in shards for t in shard.tensors}
    metadata = {"total_size": sum(shard.nbytes for shard in shards), **(extra_metadata or {})}
    text = json.dumps({"metadata": metadata, "weight_map": weight_map}, indent=2) + "\n"
    write_new(directory / INDEX_FILE, text.encode())


class ShardWriter:
    """Appends the tensors of one planned shard, in plan order, checking each against the header."""

    def __init__(
        self, path: Path, plan: ShardPlan, metadata: dict[str, str], digests: TensorDigests | None = None
    ) -> None:
        self.path = path
        self.plan = plan
        self.digests = digests  # `--verify`: checksums of what is written, checked after the write
        self._next = 0
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all(self._fd, header_bytes(plan.tensors, metadata), path)
        except BaseException:
            self.abort()
            raise

    def _expect(self, name: str) -> OutputTensor:
        if self._next >= len(self.plan.tensors) or self.plan.tensors[self._next].name != name:
            raise RuntimeError(f"writer got {name!r} out of plan order for {self.path.name}")
        self._next += 1
        return self.plan.tensors[self._next - 1]

    def write_tensor(self, name: str, tensor: torch.Tensor) -> int:
        spec = self._expect(name)
        if TORCH_TO_SAFETENSORS[tensor.dtype] != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise RuntimeError(
                f"{name}: computed {tensor.dtype} {tuple(tensor.shape)}, planned {spec.dtype} {spec.shape}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        _write_all(self._fd, memoryview(data), self.path)
        if self.digests is not None:
            self.digests.record_bytes(self.path.name, name, memoryview(data))
        return spec.nbytes

    def copy_tensors(self, names: list[str], source: SourceFile | Path, offset: int, nbytes: int) -> int:
        """Copy a run of tensors stored back to back in `source`, kernel-side where the OS allows.

        `source` is the input's open file (its one descriptor, so a file renamed over the path meanwhile is
        never read); a path is opened for this copy only.
        """
        specs = [self._expect(name) for name in names]
        if sum(spec.nbytes for spec in specs) != nbytes:
            raise RuntimeError(f"copy of {names[0]}..{names[-1]} does not match the planned sizes")
        if not isinstance(source, SourceFile) and (remote := remote_shard(source)) is not None:
            # Streamed from the Hub: the bytes pass through here once, so they are checksummed on the way.
            for spec in specs:
                crc = 0
                for piece in remote.pieces(offset, spec.nbytes):
                    _write_all(self._fd, piece, self.path)
                    crc = zlib.crc32(piece, crc)
                if self.digests is not None:
                    self.digests.expected[(self.path.name, spec.name)] = crc
                offset += spec.nbytes
            return nbytes
        with contextlib.ExitStack() as stack:
            src = source if isinstance(source, SourceFile) else stack.enter_context(SourceFile(source))
            _copy_range(src.fd, self._fd, offset, nbytes, self.path)
            if self.digests is not None:
                self.digests.record_range(self.path.name, [(s.name, s.nbytes) for s in specs], src, offset)
        return nbytes

    def close(self) -> None:
        """Check that every planned tensor was written, then make the shard durable (fsync) and close it."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if self._next != len(self.plan.tensors):
                raise RuntimeError(
                    f"{self.path.name}: {len(self.plan.tensors) - self._next} planned tensors were not written"
                )
            try:
                os.fsync(fd)
            except OSError as exc:
                _raise_write_error(exc, self.path)
        finally:
            os.close(fd)

    def abort(self) -> None:
        """Close without syncing, once: a closed descriptor's number may already belong to another file."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.close(fd)


def _raise_write_error(exc: OSError, path: Path) -> None:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise OutputError(
            "no space left on the device", path=path, fix="free disk space or choose another OUT"
        ) from None
    raise OutputError(f"write failed: {exc.strerror}", path=path) from None


# Writes go out in slices: one write() of a whole tensor (tens of MB) measured several times slower here than
# the same bytes in 8 MiB slices.
WRITE_SLICE = 8 * 1024 * 1024


def _write_all(fd: int, data: bytes | memoryview, path: Path) -> None:
    view = memoryview(data).cast("B")
    try:
        while view:
            written = os.write(fd, view[:WRITE_SLICE])
            view = view[written:]
    except OSError as exc:
        _raise_write_error(exc, path)


def _copy_range(src: int, dst: int, offset: int, nbytes: int, path: Path) -> None:
    done = 0
    try:
        while done < nbytes:
            try:
                moved = os.copy_file_range(src, dst, nbytes - done, offset + done)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                    raise
                break
            if moved == 0:
                raise OutputError("source ended early while copying", path=path, fix="the input shard is truncated")
            done += moved
        buffer = bytearray(min(COPY_CHUNK, max(nbytes - done, 1)))
        while done < nbytes:
            chunk = memoryview(buffer)[: min(len(buffer), nbytes - done)]
            got = os.preadv(src, [chunk], offset + done)
            if got == 0:
                raise OutputError("source ended early while copying", path=path, fix="the input shard is truncated")
            _write_all(dst, chunk[:got], path)
            done += got
    except OSError as exc:
        _raise_write_error(exc, path)
