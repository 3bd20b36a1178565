"""GPTQ and AWQ (GEMM) packed integer weights, by each format's documented layout (no CPU-installable reference).

GPTQ (AutoGPTQ/GPTQModel, `checkpoint_format` gptq = v1 or gptq_v2): `qweight` int32 [in*bits/32, out] packs
consecutive input rows low bits first; `qzeros` int32 [groups, out*bits/32] packs columns the same way (v1 stores
zero - 1); `scales` [groups, out]; `g_idx` [in] gives each input row its group (any order: `desc_act`).
W[k, n] = scales[g, n] * (q[k, n] - z[g, n]), g = g_idx[k]; the module's weight is its transpose [out, in].
AWQ GEMM (AutoAWQ `dequantize_gemm`): `qweight` int32 [in, out*bits/32] packs output columns in the order
0 2 4 6 1 3 5 7; `qzeros` [groups, out*bits/32] likewise; groups are consecutive input rows.
The product of an fp16 scale and a small integer is exact in fp32, so computing it there and rounding once to the
scale's dtype gives the bytes of the libraries' fp16 arithmetic.
"""

from __future__ import annotations

import torch

from lora_cli.io.safetensors_file import TensorInfo
from lora_cli.quant.base import LiftContext, QuantizedTensor, logical

GPTQ, AWQ = "gptq", "awq"
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)


def lift_gptq(tensors: dict[str, TensorInfo], context: LiftContext) -> list[QuantizedTensor]:
    qconfig = context.qconfig
    bits = _bits(context, GPTQ, (2, 4, 8))
    version = qconfig.get("checkpoint_format", "gptq")
    if version not in ("gptq", "gptq_v2"):
        raise context.refuse(f"GPTQ checkpoint_format {version!r}")
    offset = 1 if version == "gptq" else 0
    group_size = qconfig.get("group_size", 128)
    found = []
    for stem, parts in _modules(tensors, context, ("qzeros", "scales")):
        if stem + "g_idx" in tensors:
            parts["g_idx"] = tensors[stem + "g_idx"]
        rows = parts["qweight"].shape[0] * 32 // bits
        cols = parts["qweight"].shape[1]
        _check(context, stem, parts, rows, cols, bits, packed_rows=True)

        def decode(read: dict[str, torch.Tensor], rows: int = rows) -> torch.Tensor:
            return dequantize_gptq(read, bits, group_size, rows, offset)

        found.append(
            logical(stem + "weight", parts["scales"].dtype, (cols, rows), parts, decode, context, GPTQ, main="qweight")
        )
    return found


def lift_awq(tensors: dict[str, TensorInfo], context: LiftContext) -> list[QuantizedTensor]:
    qconfig = context.qconfig
    version = str(qconfig.get("version", "gemm")).lower()
    if version != "gemm":
        raise context.refuse(f"AWQ version {version!r}")  # GEMV, Marlin, ExLlama: other layouts
    if qconfig.get("zero_point", True) is False:
        raise context.refuse("AWQ without zero points")
    bits = _bits(context, AWQ, (4,))
    group_size = qconfig.get("group_size", qconfig.get("q_group_size", 128))
    found = []
    for stem, parts in _modules(tensors, context, ("qzeros", "scales")):
        rows = parts["qweight"].shape[0]
        cols = parts["qweight"].shape[1] * 32 // bits
        _check(context, stem, parts, rows, cols, bits, packed_rows=False)

        def decode(read: dict[str, torch.Tensor], rows: int = rows) -> torch.Tensor:
            return dequantize_awq(read, bits, group_size, rows)

        found.append(
            logical(stem + "weight", parts["scales"].dtype, (cols, rows), parts, decode, context, AWQ, main="qweight")
        )
    return found


def _bits(context: LiftContext, fmt: str, allowed: tuple[int, ...]) -> int:
    bits = context.qconfig.get("bits", context.qconfig.get("w_bit", 4))
    if bits not in allowed:
        raise context.refuse(f"{fmt.upper()} with {bits} bits")
    return bits


def _modules(tensors: dict[str, TensorInfo], context: LiftContext, needed: tuple[str, ...]):
    for name, info in tensors.items():
        if not name.endswith(".qweight"):
            continue
        stem = name.removesuffix("qweight")
        parts = {"qweight": info}
        for part in needed:
            if stem + part not in tensors:
                raise context.missing(stem + "weight", stem + part)
            parts[part] = tensors[stem + part]
        yield stem, parts


def _check(context: LiftContext, stem: str, parts: dict, rows: int, cols: int, bits: int, packed_rows: bool) -> None:
    scales, zeros = parts["scales"], parts["qzeros"]
    if parts["qweight"].dtype != "I32" or zeros.dtype != "I32" or not scales.torch_dtype.is_floating_point:
        raise context.bad(stem + "qweight", "qweight/qzeros must be int32 and scales a float")
    groups = scales.shape[0]
    zero_cols = cols * bits // 32
    if scales.shape != (groups, cols) or zeros.shape != (groups, zero_cols):
        raise context.bad(
            stem + "scales",
            f"scales {list(scales.shape)} / qzeros {list(zeros.shape)} do not fit a {rows}x{cols} weight",
        )
    if "g_idx" in parts and parts["g_idx"].shape != (rows,):
        raise context.bad(stem + "g_idx", f"shape {list(parts['g_idx'].shape)} is not one group per input row")


def _unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [r, c] -> int [r * 32/bits, c]: row i*per + j from bits j*bits.. of row i."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    values = torch.bitwise_right_shift(packed[:, None, :], shifts[None, :, None]) & ((1 << bits) - 1)
    return values.reshape(-1, packed.shape[1])


def _unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [r, c] -> int [r, c * 32/bits]: column i*per + j from bits j*bits.. of column i."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    values = torch.bitwise_right_shift(packed[:, :, None], shifts[None, None, :]) & ((1 << bits) - 1)
    return values.reshape(packed.shape[0], -1)


def _groups(read: dict[str, torch.Tensor], rows: int, group_size: int) -> torch.Tensor:
    if "g_idx" in read:
        return read["g_idx"].long()
    size = rows if group_size in (-1, None) else group_size
    return torch.arange(rows) // size


def dequantize_gptq(read: dict[str, torch.Tensor], bits: int, group_size: int, rows: int, offset: int) -> torch.Tensor:
    weight = _unpack_rows(read["qweight"], bits)
    zeros = _unpack_cols(read["qzeros"], bits) + offset
    groups = _groups(read, rows, group_size)
    scales = read["scales"]
    value = scales[groups].to(torch.float32) * (weight - zeros[groups]).to(torch.float32)
    return value.to(scales.dtype).t().contiguous()


def dequantize_awq(read: dict[str, torch.Tensor], bits: int, group_size: int, rows: int) -> torch.Tensor:
    per = 32 // bits
    order = torch.arange(read["qweight"].shape[1] * per).view(-1, per)[:, list(AWQ_REVERSE_ORDER)].reshape(-1)
    weight = _unpack_cols(read["qweight"], bits)[:, order]
    zeros = _unpack_cols(read["qzeros"], bits)[:, order]
    groups = _groups({}, rows, group_size)
    scales = read["scales"]
    value = (weight - zeros[groups]).to(torch.float32) * scales[groups].to(torch.float32)
    return value.to(scales.dtype).t().contiguous()
