"""Parse and validate one safetensors file's header, and read tensors from it by byte range.

We parse the header ourselves (it is 8 bytes of length and a JSON object) because streaming needs what the
`safetensors` package does not expose: the absolute byte range of every tensor, so that untouched tensors can be
copied without being decoded. Every check here turns a corrupt file into an `InputError` naming it.
"""

from __future__ import annotations

import ctypes
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lora_cli.errors import InputError
from lora_cli.io.dtypes import ITEMSIZES, itemsize
from lora_cli.io.files import SourceFile
from lora_cli.io.jsonio import DuplicateKeyError, JsonProblem, parse_json, reject_duplicate_keys
from lora_cli.io.remote import remote_shard

if TYPE_CHECKING:  # torch is imported where tensors are read, so that reading headers stays fast
    import torch

# The reference implementation refuses headers above 100 MB; a larger claim means a corrupt or hostile file.
MAX_HEADER_BYTES = 100 * 1024 * 1024
PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")
# Shapes and offsets are usize in the reference; element counts must also fit torch's int64 sizes.
USIZE_MAX = 2**64 - 1
MAX_ELEMENTS = 2**63 - 1

__all__ = ["DuplicateKeyError", "SafetensorsFile", "TensorInfo", "read_header", "read_tensor", "reject_duplicate_keys"]


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: file, absolute offset, length, and how to decode them.

    `handle` is the file's one open descriptor (see `lora_cli.io.files`): reads go through it, never by path.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int
    handle: SourceFile | None = field(default=None, compare=False, repr=False)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        from lora_cli.io.dtypes import SAFETENSORS_TO_TORCH

        return SAFETENSORS_TO_TORCH[self.dtype]

    @property
    def stored(self) -> bool:
        """The bytes at `offset` are this tensor (a quantized weight's logical tensor is computed instead)."""
        return True


@dataclass(frozen=True)
class SafetensorsFile:
    """A validated safetensors header: its tensors in file order and its string metadata.

    It owns the file's open descriptor (`handle`), closed by `close()`, the context manager, or collection.
    """

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    size: int
    handle: SourceFile | None = field(default=None, compare=False, repr=False)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_unchanged(self) -> None:
        """Refuse (naming the file) when it was modified or replaced since its header was read."""
        if self.handle is not None:
            self.handle.check_unchanged()


def _corrupt(path: Path, what: str) -> InputError:
    return InputError(
        f"not a valid safetensors file: {what}",
        path=path,
        fix="the file is corrupt or truncated; download or export it again",
    )


def _pread_exact(fd: int, nbytes: int, offset: int) -> bytes:
    chunks, done = [], 0
    while done < nbytes:
        chunk = os.pread(fd, nbytes - done, offset + done)
        if not chunk:
            break
        chunks.append(chunk)
        done += len(chunk)
    return b"".join(chunks)


def _is_count(value: object) -> bool:
    """A JSON integer as safetensors' usize fields take it: not a bool (True is an int in Python), not negative."""
    return type(value) is int and 0 <= value <= USIZE_MAX


def read_header(path: Path) -> SafetensorsFile:
    """Open a safetensors file once and check its header as strictly as the reference parser: sizes, dtypes,
    integer shapes whose element counts fit, string metadata, and byte ranges that tile the data exactly."""
    path = Path(path)
    if (remote := remote_shard(path)) is not None:  # a Hub shard streamed by range (lora_cli/io/remote.py)
        return parse_header(path, *remote.header())
    handle = SourceFile(path, missing_fix="check the path and that every shard is present")
    try:
        return parse_header(path, *_read_raw_header(path, handle), handle=handle)
    except BaseException:
        handle.close()
        raise


def _read_raw_header(path: Path, handle: SourceFile) -> tuple[bytes, int]:
    """(the JSON header's bytes, the file size), read through the descriptor the tensors will be read through."""
    size = handle.size
    prefix = _pread_exact(handle.fd, 9, 0)
    # A header length can begin with the same two bytes as a pickle (640 = 80 02 ...): a real header's
    # JSON then starts with "{" at byte 8, which no pickle or zip has there.
    if prefix.startswith(PICKLE_MAGIC) and prefix[8:9] != b"{":
        raise InputError(
            "is a pickle (torch.save) file, not safetensors",
            path=path,
            fix="loractl never unpickles model weights; convert it to safetensors with a trusted tool",
        )
    if len(prefix) < 8:
        raise _corrupt(path, f"{size} bytes is too short for a header")
    (header_len,) = struct.unpack("<Q", prefix[:8])
    if header_len > MAX_HEADER_BYTES:
        raise _corrupt(path, f"header claims {header_len} bytes (more than the 100 MB limit)")
    if 8 + header_len > size:
        raise _corrupt(path, f"header claims {header_len} bytes but the file has {size}")
    raw = _pread_exact(handle.fd, header_len, 8)
    if len(raw) != header_len:
        raise _corrupt(path, "file ended inside its header")
    return raw, size


def parse_header(path: Path, raw: bytes, size: int, handle: SourceFile | None = None) -> SafetensorsFile:
    """Check the JSON header `raw` of a file of `size` bytes (see read_header); `handle`, the open local file."""
    header_len = len(raw)
    try:
        header = parse_json(raw, unique_keys=True)
    except DuplicateKeyError as exc:
        raise _corrupt(path, f"the header lists {exc.args[0]!r} twice") from None
    except JsonProblem as exc:
        raise _corrupt(path, f"header {exc.args[0]}") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")

    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _corrupt(path, "__metadata__ must map strings to strings")
    data_start = 8 + header_len
    data_size = size - data_start
    entries: list[tuple[int, int, str, str, tuple[int, ...]]] = []
    for name, spec in header.items():
        if not isinstance(spec, dict):
            raise _corrupt(path, f"entry {name!r} is not an object")
        dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in ITEMSIZES:
            raise _corrupt(path, f"tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise _corrupt(path, f"tensor {name!r} has an invalid shape {shape!r}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
            raise _corrupt(path, f"tensor {name!r} has invalid data_offsets {offsets!r}")
        if offsets[1] < offsets[0]:
            raise _corrupt(path, f"tensor {name!r} has invalid data_offsets {offsets!r}")
        # The reference multiplies the dimensions in order in a usize and refuses an overflow, even when a later
        # dimension is 0; torch's sizes are int64, so counts must also fit there.
        numel = 1
        for dim in shape:
            numel *= dim
            if numel > MAX_ELEMENTS:
                raise _corrupt(path, f"tensor {name!r} has a shape {shape} whose element count overflows")
        expected = numel * itemsize(dtype)
        if offsets[1] - offsets[0] != expected:
            raise _corrupt(path, f"tensor {name!r} spans {offsets[1] - offsets[0]} bytes, its shape needs {expected}")
        entries.append((offsets[0], offsets[1], name, dtype, tuple(shape)))

    # Stable on the byte range only: zero-size tensors share an offset and keep the header's (the writer's) order.
    entries.sort(key=lambda entry: (entry[0], entry[1]))
    position = 0
    for begin, end, name, _, _ in entries:
        if begin < position:
            raise _corrupt(path, f"tensor {name!r} overlaps the tensor before it")
        if begin > position:
            raise _corrupt(path, f"a gap of {begin - position} bytes lies before tensor {name!r}")
        position = end
    if position > data_size:
        raise _corrupt(path, f"tensors need {position} bytes of data but the file holds {data_size} (truncated)")
    if position < data_size:
        raise _corrupt(path, f"{data_size - position} bytes after the last tensor")

    tensors = {
        name: TensorInfo(name, dtype, shape, path, data_start + begin, end - begin, handle)
        for begin, end, name, dtype, shape in entries
    }
    return SafetensorsFile(
        path=path, tensors=tensors, metadata=dict(metadata), data_start=data_start, size=size, handle=handle
    )


def read_tensor(info: TensorInfo, into: torch.Tensor | None = None) -> torch.Tensor:
    """Read one tensor's bytes with a positioned read (no mmap, so no page-cache growth in our RSS).

    `into`, a uint8 CPU tensor of at least `info.nbytes` bytes, receives the bytes instead of a new buffer; the
    tensor returned is then a view of it. A quantized weight's logical tensor (not `stored`) is dequantized from
    its parts instead, into a new tensor (lora_cli/quant/base.py).
    """
    import torch

    if not info.stored:
        return info.dequantize()  # type: ignore[attr-defined]
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.torch_dtype)
    if into is None:
        buffer: bytearray | ctypes.Array[ctypes.c_char] = bytearray(info.nbytes)
    else:
        if into.dtype != torch.uint8 or into.device.type != "cpu" or into.numel() < info.nbytes:
            raise ValueError(f"read buffer of {into.numel()} {into.dtype} on {into.device} for {info.nbytes} bytes")
        buffer = (ctypes.c_char * info.nbytes).from_address(into.data_ptr())
    view = memoryview(buffer).cast("B")
    if (remote := remote_shard(info.file)) is not None:
        remote.read_into(view, info.offset)
    else:
        _read_local(info, view)
    if into is None:
        return torch.frombuffer(buffer, dtype=info.torch_dtype).reshape(info.shape)
    return into[: info.nbytes].view(info.torch_dtype).view(info.shape)


def _read_local(info: TensorInfo, view: memoryview) -> None:
    # Through the descriptor the header was read from: a file renamed over the path meanwhile is not read.
    source = info.handle if info.handle is not None else SourceFile(info.file)
    try:
        done = 0
        while done < info.nbytes:
            got = os.preadv(source.fd, [view[done:]], info.offset + done)
            if got == 0:
                raise InputError(
                    f"ended while reading tensor {info.name!r}",
                    path=info.file,
                    fix="was it truncated or changed while loractl ran? leave inputs alone and run again",
                )
            done += got
    finally:
        if source is not info.handle:
            source.close()
