"""The contract every format module fulfils: a quantized weight as one logical tensor with its stored parts."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch

from lora_cli.errors import InputError, LoraCtlError
from lora_cli.io.dtypes import NAMED_DTYPES, TORCH_TO_SAFETENSORS, itemsize
from lora_cli.io.safetensors_file import TensorInfo, read_tensor

Read = Callable[[TensorInfo], torch.Tensor]
# The stored parts, read as stored and keyed by role ("weight", "scale"...) -> the logical tensor.
Decode = Callable[[dict[str, torch.Tensor]], torch.Tensor]
EXTRA_FIX = "pip install loractl[quant]"


class MissingExtraError(LoraCtlError):
    """A format's own library is needed and not installed."""


class UnsupportedQuantError(LoraCtlError):
    """A quantization format or variant loractl does not read (refused by name)."""


@dataclass(frozen=True)
class QuantizedTensor(TensorInfo):
    """One quantized weight as the model sees it: name, logical shape and the dtype its dequantization returns.

    `file` and `offset` are those of the main stored part (so that plans keep the shard order); `nbytes` is the
    logical size. The bytes at `offset` are not this tensor: read it with `dequantize()`, never as a byte range.
    """

    format: str = ""
    parts: dict[str, TensorInfo] = field(default_factory=dict, hash=False, compare=False)
    decode: Decode | None = field(default=None, hash=False, compare=False, repr=False)
    # The dtype written when no --dtype is given: the model's compute dtype (quantized data has none of its own).
    output_dtype: str = "BF16"
    # `decode` runs on the parts' device, in exact IEEE operations only (conversions, lookups, one multiply per
    # element), so a GPU gives the CPU's bytes: the engine then dequantizes on the device it merges on.
    exact_anywhere: bool = False

    @property
    def stored(self) -> bool:
        return False

    @property
    def stored_bytes(self) -> int:
        return sum(part.nbytes for part in self.parts.values())

    def dequantize(self, read: Read = read_tensor) -> torch.Tensor:
        """The exact values the format's reference dequantization returns, in `self.torch_dtype`."""
        return self.decode_parts(self.read_parts(read))

    def read_parts(self, read: Read = read_tensor) -> dict[str, torch.Tensor]:
        """The stored parts, keyed by role: the bytes `decode_parts` needs (the engine reads them ahead)."""
        return {role: read(info) for role, info in self.parts.items()}

    def decode_parts(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """The logical tensor from parts read by `read_parts`, checked against the shape and dtype promised."""
        assert self.decode is not None
        value = self.decode(parts)
        if tuple(value.shape) != self.shape or value.dtype != self.torch_dtype:
            raise InputError(
                f"{self.name} dequantized to {tuple(value.shape)} {value.dtype}, its parts promised "
                f"{self.shape} {self.torch_dtype}",
                path=self.file,
                fix="the quantized tensors disagree with each other; re-download the checkpoint",
            )
        return value


@dataclass(frozen=True)
class LiftContext:
    """What every format module needs besides the tensors: where they are and the compute dtype for outputs."""

    directory: Path
    qconfig: dict
    compute_dtype: str  # safetensors spelling, e.g. "BF16"

    def missing(self, weight: str, part: str) -> InputError:
        return InputError(
            f"quantized weight {weight} has no {part} tensor",
            path=self.directory,
            fix=f"{part} is needed to dequantize it; download every shard of the checkpoint again",
        )

    def bad(self, name: str, what: str) -> InputError:
        return InputError(f"{name}: {what}", path=self.directory, fix="re-download or re-export the checkpoint")

    def refuse(self, variant: str) -> UnsupportedQuantError:
        return UnsupportedQuantError(
            f"{variant} is not supported",
            path=self.directory,
            fix="dequantize the checkpoint with its own library first, or see README 'Quantized bases'",
        )


def logical(
    name: str,
    dtype: str,
    shape: tuple[int, ...],
    parts: dict[str, TensorInfo],
    decode: Decode,
    context: LiftContext,
    fmt: str,
    main: str = "weight",
    exact_anywhere: bool = False,
) -> QuantizedTensor:
    anchor = parts[main]
    return QuantizedTensor(
        name=name,
        dtype=dtype,
        shape=tuple(shape),
        file=anchor.file,
        offset=anchor.offset,
        nbytes=math.prod(shape) * itemsize(dtype),
        format=fmt,
        parts=dict(parts),
        decode=decode,
        output_dtype=context.compute_dtype,
        exact_anywhere=exact_anywhere,
    )


def require(module: str, fmt: str) -> ModuleType:
    """Import a format's own library, or say in one line which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(
            f"reading a {fmt} checkpoint needs the {module} package, which is not installed", fix=EXTRA_FIX
        ) from None


def safetensors_dtype(name: object, default: str = "BF16") -> str:
    """A config's dtype name ("bfloat16", "torch.float16") in safetensors spelling; `default` when absent/odd."""
    if isinstance(name, str):
        dtype = NAMED_DTYPES.get(name.removeprefix("torch."))
        if dtype is not None:
            return TORCH_TO_SAFETENSORS[dtype]
    return default


def read_small(info: TensorInfo) -> torch.Tensor:
    """A small auxiliary tensor (a quant state, a shape) read while planning; copied out of its buffer."""
    return read_tensor(info).clone()
