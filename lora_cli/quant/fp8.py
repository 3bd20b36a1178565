"""FP8 weights: fine-grained block scales (DeepSeek-V3, Qwen3-FP8: `weight_scale_inv` per 128x128 block),
per-tensor and per-channel scales (`quant_method: fp8` without blocks, `fbgemm_fp8`'s `weight_scale`).

Dequantization is the formula of DeepSeek's `weight_dequant` and transformers' `_dequantize_fp8_weight`, kept in
fp32: fp32(W8) x its block's scale, one fp32 rounding per element, no bf16 step (transformers rounds to the
model's dtype first; W + delta rounded once from fp32 is what PEFT on fp32 weights gives). A dimension the block
does not divide has a partial last block: the scale grid is ceil(rows/bm) x ceil(cols/bk), as DeepSeek writes it.
Scales may be fp32/bf16, power-of-two `float8_e8m0fnu` (`scale_fmt: ue8m0`), or uint8 E8M0 exponents (MXFP8).
"""

from __future__ import annotations

import math

import torch

from lora_cli.io.safetensors_file import TensorInfo
from lora_cli.quant.base import LiftContext, QuantizedTensor, logical

NAME = "fp8"
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
SCALE_SUFFIXES = ("weight_scale_inv", "weight_scale")
# Per-layer activation scales (static schemes) are only for quantized activations: consumed, not written.
ACTIVATION_SUFFIXES = ("input_scale", "activation_scale")
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max


def lift(tensors: dict[str, TensorInfo], context: LiftContext) -> list[QuantizedTensor]:
    block = _block_size(context)
    found = []
    for name, info in tensors.items():
        if info.dtype not in FP8_DTYPES or not name.endswith(".weight"):
            continue
        stem = name.removesuffix("weight")
        scale = next((tensors[stem + s] for s in SCALE_SUFFIXES if stem + s in tensors), None)
        if scale is None:
            raise context.missing(name, stem + SCALE_SUFFIXES[0])
        parts = {"weight": info, "scale": scale}
        parts.update({s: tensors[stem + s] for s in ACTIVATION_SUFFIXES if stem + s in tensors})
        grid = scale_grid(info.shape, scale.shape, block)
        if grid is None:
            raise context.bad(
                scale.name,
                f"shape {list(scale.shape)} fits neither a scalar, one scale per row, "
                f"nor {block} blocks of the weight's {list(info.shape)}",
            )

        def decode(read: dict[str, torch.Tensor], grid: tuple[int, int] | None = grid) -> torch.Tensor:
            return dequantize(read["weight"], read["scale"], grid)

        found.append(logical(name, "F32", info.shape, parts, decode, context, NAME, exact_anywhere=True))
    return found


def _block_size(context: LiftContext) -> tuple[int, int] | None:
    block = context.qconfig.get("weight_block_size")
    if block is not None and not (
        isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)
    ):
        raise context.bad("quantization_config.weight_block_size", f"{block!r} is not two positive integers")
    return block_size(context.qconfig)


def block_size(qconfig: dict) -> tuple[int, int] | None:
    """The config's [rows, cols] block (checked when the checkpoint was opened), None without one."""
    block = qconfig.get("weight_block_size")
    return (block[0], block[1]) if block else None


def scale_grid(
    weight: tuple[int, ...], scale: tuple[int, ...], block: tuple[int, int] | None
) -> tuple[int, int] | None:
    """The block (rows, cols) each scale covers: (rows, cols) of the whole weight for one scale, (1, cols) for one
    per row; None when the scale's shape fits nothing. Leading dims (stacked experts) must agree."""
    if len(weight) < 2:
        return None
    rows, cols = weight[-2:]
    if math.prod(scale) == 1 and len(scale) <= len(weight):
        return rows, cols
    blocks = (math.ceil(rows / block[0]), math.ceil(cols / block[1])) if block is not None else None
    if block is not None and tuple(scale) == (*weight[:-2], *blocks):
        return block
    if tuple(scale) in ((*weight[:-1],), (*weight[:-1], 1)):
        return 1, cols
    return None


def scale_fp32(scale: torch.Tensor) -> torch.Tensor:
    """Scales as fp32: uint8 holds E8M0 exponents (2 ** (byte - 127), as transformers reads MXFP8)."""
    if scale.dtype == torch.uint8:
        return (scale.to(torch.float32) - 127.0).exp2()
    return scale.to(torch.float32)


def dequantize(weight: torch.Tensor, scale: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
    """fp32(W8) * scale of each element's block, in fp32; a block-row at a time (no weight-sized scale map)."""
    out = weight.to(torch.float32)
    scales = scale_fp32(scale)
    rows, cols = out.shape[-2:]
    if grid is None or grid == (rows, cols):
        return out.mul_(scales.reshape(()))
    block_rows, block_cols = grid
    stacked = out.reshape(-1, rows, cols)
    if grid == (1, cols):
        stacked.mul_(scales.reshape(stacked.shape[0], rows, 1))
        return out
    grid_rows = math.ceil(rows / block_rows)
    scales = scales.reshape(stacked.shape[0], grid_rows, -1)
    for index in range(grid_rows):
        # Each scale repeated over its block's columns, cut at the weight's edge (the partial last block).
        row_scales = scales[:, index].repeat_interleave(block_cols, dim=-1)[:, :cols]
        stacked[:, index * block_rows : (index + 1) * block_rows].mul_(row_scales[:, None, :])
    return out


def quantize_blocks(weight: torch.Tensor, block: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """--requantize: E4M3 weight and fp32 `weight_scale_inv` per block (or per row when `block` is (1, cols)),
    by transformers' `Fp8Quantize` (scale = amax / 448; zero blocks keep scale 1), with ragged last blocks."""
    value = weight.to(torch.float32)
    rows, cols = value.shape[-2:]
    block_rows, block_cols = block if block is not None else (rows, cols)
    grid_rows, grid_cols = math.ceil(rows / block_rows), math.ceil(cols / block_cols)
    padded = torch.zeros(*value.shape[:-2], grid_rows * block_rows, grid_cols * block_cols)
    padded[..., :rows, :cols] = value
    tiles = padded.reshape(*value.shape[:-2], grid_rows, block_rows, grid_cols, block_cols)
    max_abs = tiles.abs().amax(dim=(-3, -1))
    scales = torch.where(max_abs > 0, E4M3_MAX / max_abs.where(max_abs > 0, torch.ones_like(max_abs)), 1.0)
    inverse = (1.0 / scales).to(torch.float32)
    quantized = (tiles * scales[..., :, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    quantized = quantized.reshape(padded.shape)[..., :rows, :cols].contiguous()
    if block is None:
        inverse = inverse.reshape(())
    return quantized, inverse
