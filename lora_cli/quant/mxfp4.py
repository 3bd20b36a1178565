"""MXFP4 expert weights (gpt-oss): `<name>_blocks` uint8 [experts, rows, groups, 16] hold two E2M1 values per byte
(low nibble first), `<name>_scales` uint8 [experts, rows, groups] one E8M0 exponent per 32 values.

Dequantized as transformers' `convert_moe_packed_tensors` does: the E2M1 table in the model's compute dtype,
`ldexp` by (scale - 127), then the last two dims transposed to the [experts, in, out] the model uses.
"""

from __future__ import annotations

import torch

from lora_cli.io.dtypes import SAFETENSORS_TO_TORCH
from lora_cli.io.safetensors_file import TensorInfo
from lora_cli.quant.base import LiftContext, QuantizedTensor, logical

NAME = "mxfp4"
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def lift(tensors: dict[str, TensorInfo], context: LiftContext) -> list[QuantizedTensor]:
    dtype = context.compute_dtype
    found = []
    for name, info in tensors.items():
        if not name.endswith("_blocks"):
            continue
        stem = name.removesuffix("_blocks")
        scales = tensors.get(stem + "_scales")
        if scales is None:
            raise context.missing(stem, stem + "_scales")
        if info.dtype != "U8" or scales.dtype != "U8" or len(info.shape) != 4 or info.shape[-1] != 16:
            raise context.refuse(f"MXFP4 blocks other than uint8 [experts, rows, groups, 16] ({name})")
        if scales.shape != info.shape[:-1]:
            raise context.bad(scales.name, f"shape {list(scales.shape)} is not one scale per block of {name}")
        experts, rows, groups, width = info.shape
        shape = (experts, groups * width * 2, rows)

        def decode(read: dict[str, torch.Tensor], dtype: str = dtype) -> torch.Tensor:
            return dequantize(read["blocks"], read["scales"], SAFETENSORS_TO_TORCH[dtype])

        found.append(
            logical(stem, dtype, shape, {"blocks": info, "scales": scales}, decode, context, NAME, main="blocks")
        )
    return found


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Row by row of the table, so the index tensors stay one row-block in size."""
    exponents = scales.to(torch.int32) - 127
    lut = torch.tensor(FP4_VALUES, dtype=dtype)
    *prefix, groups, width = blocks.shape
    rows = blocks.reshape(-1, width)
    out = torch.empty(rows.shape[0], width * 2, dtype=dtype)
    out[:, 0::2] = lut[(rows & 0x0F).to(torch.int)]
    out[:, 1::2] = lut[(rows >> 4).to(torch.int)]
    torch.ldexp(out, exponents.reshape(-1, 1), out=out)
    return out.reshape(*prefix, groups * width * 2).transpose(1, 2).contiguous()
