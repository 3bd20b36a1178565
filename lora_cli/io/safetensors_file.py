"""Parse and validate one safetensors file's header, and read tensors from it by byte range.

We parse the header ourselves (it is 8 bytes of length and a JSON object) because streaming needs what the
`safetensors` package does not expose: the absolute byte range of every tensor, so that untouched tensors can be
copied without being decoded. Every check here turns a corrupt file into an `InputError` naming it.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lora_cli.errors import InputError
from lora_cli.io.dtypes import ITEMSIZES, itemsize

if TYPE_CHECKING:  # torch is imported where tensors are read, so that reading headers stays fast
    import torch

# The reference implementation refuses headers above 100 MB; a larger claim means a corrupt or hostile file.
MAX_HEADER_BYTES = 100 * 1024 * 1024
PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: file, absolute offset, length, and how to decode them."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        from lora_cli.io.dtypes import SAFETENSORS_TO_TORCH

        return SAFETENSORS_TO_TORCH[self.dtype]


@dataclass(frozen=True)
class SafetensorsFile:
    """A validated safetensors header: its tensors in file order and its string metadata."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    size: int


def _corrupt(path: Path, what: str) -> InputError:
    return InputError(
        f"not a valid safetensors file: {what}",
        path=path,
        fix="the file is corrupt or truncated; download or export it again",
    )


class DuplicateKeyError(ValueError):
    """A JSON object names the same key twice; args[0] is the key."""


def reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """`object_pairs_hook` for json.loads, which otherwise keeps the last of duplicate keys silently: a tensor
    listed twice in a header or an index means a corrupt file, not a choice to make for the user."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise DuplicateKeyError(key)
        seen.add(key)
    return dict(pairs)


def read_header(path: Path) -> SafetensorsFile:
    """Read and check a safetensors header: sizes, dtypes, and byte ranges that tile the data exactly."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(9)
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
            handle.seek(8)
            raw = handle.read(header_len)
    except FileNotFoundError:
        raise InputError("file not found", path=path, fix="check the path and that every shard is present") from None
    except IsADirectoryError:
        raise InputError("is a folder, expected a .safetensors file", path=path) from None
    except PermissionError:
        raise InputError("permission denied", path=path, fix="make the file readable") from None
    try:
        header = json.loads(raw, object_pairs_hook=reject_duplicate_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _corrupt(path, f"header is not JSON ({exc.__class__.__name__})") from None
    except DuplicateKeyError as exc:
        raise _corrupt(path, f"the header lists {exc.args[0]!r} twice") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _corrupt(path, "__metadata__ must map strings to strings")
    data_start = 8 + header_len
    data_size = size - data_start
    entries: list[tuple[int, int, str, str, tuple[int, ...]]] = []
    for name, spec in header.items():
        if not isinstance(spec, dict):
            raise _corrupt(path, f"entry {name!r} is not an object")
        dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
        if dtype not in ITEMSIZES:
            raise _corrupt(path, f"tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise _corrupt(path, f"tensor {name!r} has an invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and o >= 0 for o in offsets)
            or offsets[1] < offsets[0]
        ):
            raise _corrupt(path, f"tensor {name!r} has invalid data_offsets {offsets!r}")
        expected = math.prod(shape) * itemsize(dtype)
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
        name: TensorInfo(name, dtype, shape, path, data_start + begin, end - begin)
        for begin, end, name, dtype, shape in entries
    }
    return SafetensorsFile(path=path, tensors=tensors, metadata=dict(metadata), data_start=data_start, size=size)


def read_tensor(info: TensorInfo, into: torch.Tensor | None = None) -> torch.Tensor:
    """Read one tensor's bytes with a positioned read (no mmap, so no page-cache growth in our RSS).

    `into`, a uint8 CPU tensor of at least `info.nbytes` bytes, receives the bytes instead of a new buffer; the
    tensor returned is then a view of it.
    """
    import torch

    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.torch_dtype)
    if into is None:
        buffer: bytearray | ctypes.Array[ctypes.c_char] = bytearray(info.nbytes)
    else:
        if into.dtype != torch.uint8 or into.device.type != "cpu" or into.numel() < info.nbytes:
            raise ValueError(f"read buffer of {into.numel()} {into.dtype} on {into.device} for {info.nbytes} bytes")
        buffer = (ctypes.c_char * info.nbytes).from_address(into.data_ptr())
    view = memoryview(buffer).cast("B")
    try:
        with open(info.file, "rb", buffering=0) as handle:
            done = 0
            while done < info.nbytes:
                got = os.preadv(handle.fileno(), [view[done:]], info.offset + done)
                if got == 0:
                    raise _corrupt(info.file, f"file ended while reading tensor {info.name!r}")
                done += got
    except FileNotFoundError:
        raise InputError("file disappeared while reading", path=info.file) from None
    if into is None:
        return torch.frombuffer(buffer, dtype=info.torch_dtype).reshape(info.shape)
    return into[: info.nbytes].view(info.torch_dtype).view(info.shape)
