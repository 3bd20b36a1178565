"""The safetensors dtype names and their torch equivalents."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# Byte sizes and float-ness of the safetensors dtypes, known without torch: reading a header (verify, inspect of a
# checkpoint, the start of every command) must not pay torch's import (2 s on a small machine).
ITEMSIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
}  # fmt: skip
# F8_E8M0: power-of-two scales (ue8m0 FP8, MX formats), read by lora_cli/quant.
FLOATS = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0"})


def _torch_tables() -> dict[str, Any]:
    import torch

    to_torch = {
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
        "F8_E8M0": torch.float8_e8m0fnu,
    }
    return {
        "SAFETENSORS_TO_TORCH": to_torch,
        "TORCH_TO_SAFETENSORS": {v: k for k, v in to_torch.items()},
        # Names accepted by --dtype and found in config.json ("torch_dtype"/"dtype").
        "NAMED_DTYPES": {
            "float32": torch.float32,
            "float16": torch.float16,
            "bfloat16": torch.bfloat16,
            "float64": torch.float64,
        },
    }


def __getattr__(name: str) -> Any:
    """SAFETENSORS_TO_TORCH, TORCH_TO_SAFETENSORS and NAMED_DTYPES, built (and torch imported) on first use."""
    if name in ("SAFETENSORS_TO_TORCH", "TORCH_TO_SAFETENSORS", "NAMED_DTYPES"):
        globals().update(_torch_tables())
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def itemsize(dtype: str) -> int:
    return ITEMSIZES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """The config.json spelling of a torch dtype ("bfloat16")."""
    return str(dtype).removeprefix("torch.")


def is_float(dtype: str) -> bool:
    return dtype in FLOATS


def dominant_dtype(sized: Iterable[tuple[str, int]]) -> str | None:
    """The dtype most bytes are in, from (dtype, nbytes) pairs (what `dtype="auto"` loads); None when empty."""
    sizes: dict[str, int] = {}
    for dtype, nbytes in sized:
        sizes[dtype] = sizes.get(dtype, 0) + nbytes
    return max(sizes, key=sizes.__getitem__) if sizes else None
