"""The safetensors dtype names and their torch equivalents."""

from __future__ import annotations

from collections.abc import Iterable

import torch

SAFETENSORS_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_SAFETENSORS: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_TO_TORCH.items()}

# Names accepted by --dtype and found in config.json ("torch_dtype"/"dtype").
NAMED_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def itemsize(dtype: str) -> int:
    return SAFETENSORS_TO_TORCH[dtype].itemsize


def dtype_name(dtype: torch.dtype) -> str:
    """The config.json spelling of a torch dtype ("bfloat16")."""
    return str(dtype).removeprefix("torch.")


def is_float(dtype: str) -> bool:
    return SAFETENSORS_TO_TORCH[dtype].is_floating_point


def dominant_dtype(sized: Iterable[tuple[str, int]]) -> str | None:
    """The dtype most bytes are in, from (dtype, nbytes) pairs (what `dtype="auto"` loads); None when empty."""
    sizes: dict[str, int] = {}
    for dtype, nbytes in sized:
        sizes[dtype] = sizes.get(dtype, 0) + nbytes
    return max(sizes, key=sizes.__getitem__) if sizes else None
