"""bitsandbytes checkpoints saved by transformers: 4-bit NF4/FP4 (with or without double quantization) and
LLM.int8() (`SCB`), dequantized by bitsandbytes' own formulas, as PEFT's `dequantize_bnb_weight` gets them.

4-bit: code[nibble] x its block's absmax in fp32, rounded to the quant state's dtype (the dtype the weight had
when quantized), as bitsandbytes' `dequantize_4bit` computes it (its portable kernel `_dequantize_4bit_compute`,
which its CPU and CUDA kernels match); int8: q x SCB / 127 in fp32 (`int8_vectorwise_dequant`). Both are written
here in torch rather than imported: importing bitsandbytes costs 8-15 s and about 100 MiB (it imports
torch._dynamo), more than a 1.1B merge. tests/test_quant_formats.py checks them bit for bit against bitsandbytes.
Only `--requantize` (`quantize_nf4`) needs the library.
"""

from __future__ import annotations

import functools
import json
import math

import torch

from lora_cli.io.dtypes import TORCH_TO_SAFETENSORS
from lora_cli.io.safetensors_file import TensorInfo
from lora_cli.quant.base import LiftContext, QuantizedTensor, logical, read_small, require

NAME = "bitsandbytes"
STATE_PREFIX = "quant_state.bitsandbytes__"
FOUR_BIT_TYPES = ("nf4", "fp4")
FOUR_BIT_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def lift(tensors: dict[str, TensorInfo], context: LiftContext) -> list[QuantizedTensor]:
    qconfig = context.qconfig
    if qconfig.get("load_in_4bit") or qconfig.get("_load_in_4bit"):
        return _lift_4bit(tensors, context)
    if qconfig.get("load_in_8bit") or qconfig.get("_load_in_8bit"):
        return _lift_8bit(tensors, context)
    raise context.refuse("a bitsandbytes quantization_config with neither load_in_4bit nor load_in_8bit")


def _lift_4bit(tensors: dict[str, TensorInfo], context: LiftContext) -> list[QuantizedTensor]:
    found = []
    for name, info in tensors.items():
        if not name.endswith(".weight") or (f"{name}.absmax" not in tensors and f"{name}.quant_map" not in tensors):
            continue
        states = [n for n in tensors if n.startswith(f"{name}.{STATE_PREFIX}")]
        if not states:
            raise context.missing(name, f"{name}.{STATE_PREFIX}nf4")
        kind = states[0].removeprefix(f"{name}.{STATE_PREFIX}")
        if kind not in FOUR_BIT_TYPES or len(states) > 1:
            raise context.refuse(f"bitsandbytes 4-bit quant type {kind!r} (of {name})")
        state = _unpack_state(read_small(tensors[states[0]]), states[0], context)
        for part in ("absmax", "quant_map"):
            if f"{name}.{part}" not in tensors:
                raise context.missing(name, f"{name}.{part}")
        if "nested_blocksize" in state:
            for part in ("nested_absmax", "nested_quant_map"):
                if f"{name}.{part}" not in tensors:
                    raise context.missing(name, f"{name}.{part}")
        parts = {"weight": info, "state": tensors[states[0]]}
        parts.update({p: tensors[f"{name}.{p}"] for p in FOUR_BIT_PARTS if f"{name}.{p}" in tensors})
        shape, dtype = state.get("shape"), getattr(torch, str(state.get("dtype")), None)
        if not isinstance(shape, list) or not isinstance(dtype, torch.dtype) or dtype not in TORCH_TO_SAFETENSORS:
            raise context.bad(states[0], f"quant state has no usable shape/dtype ({shape!r}, {state.get('dtype')!r})")
        if not _usable_state(state, kind):
            raise context.bad(states[0], "quant state lacks its quant_type, blocksize or nested_* entries")
        stored = TORCH_TO_SAFETENSORS[dtype]
        decode = functools.partial(_decode_4bit, state=state)  # the state checked here, not parsed again per read
        found.append(logical(name, stored, tuple(shape), parts, decode, context, NAME, exact_anywhere=True))
    return found


def _usable_state(state: dict, kind: str) -> bool:
    blocks = [state.get("blocksize")]
    if "nested_blocksize" in state:
        blocks.append(state["nested_blocksize"])
        if not isinstance(state.get("nested_offset"), (int, float)):
            return False
        if not isinstance(getattr(torch, str(state.get("nested_dtype")), None), torch.dtype):
            return False
    return state.get("quant_type") == kind and all(isinstance(b, int) and b > 0 for b in blocks)


def _unpack_state(raw: torch.Tensor, name: str, context: LiftContext) -> dict:
    try:
        state = json.loads(bytes(raw.numpy().tobytes()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise context.bad(name, "quant state is not the JSON bitsandbytes writes") from None
    if not isinstance(state, dict):
        raise context.bad(name, "quant state is not a JSON object")
    return state


# Elements dequantized per step: the lookup's fp32 values and indices stay a few MiB, not the weight's size.
STEP = 1 << 22


def _decode_4bit(read: dict[str, torch.Tensor], state: dict) -> torch.Tensor:
    absmax = read["absmax"]
    if "nested_absmax" in read:
        nested = blockwise(absmax, read["nested_quant_map"], read["nested_absmax"], state["nested_blocksize"])
        absmax = nested.to(getattr(torch, state["nested_dtype"])).add_(torch.tensor(float(state["nested_offset"])))
    dtype = getattr(torch, state["dtype"])
    return dequantize_4bit(read["weight"], read["quant_map"], absmax.float(), state["blocksize"], state["shape"], dtype)


def blockwise(codes: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """bitsandbytes' `dequantize_blockwise` (the double quantization's absmax): code[byte] x its block's absmax."""
    values = code.float()[codes.reshape(-1).long()]
    return _scale_blocks(values, absmax.float(), blocksize, 0)


def dequantize_4bit(
    packed: torch.Tensor,
    code: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    shape: list[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """bitsandbytes' `dequantize_4bit` as its portable kernel `_dequantize_4bit_compute` computes it: two elements
    a byte (high nibble first), code[nibble] x its block's absmax in fp32, then rounded to `dtype`; a step of whole
    blocks at a time. Its CPU kernel gives the same values, with one known difference of sign: it decodes FP4's
    nibble 8 as -0 where the stored code holds +0 (-0 and +0 add to a delta alike)."""
    count = math.prod(shape)
    data = packed.reshape(-1).view(torch.uint8)
    code = code.float()
    # Two bytes (four elements) a lookup: the int16 value v = b0 | b1 << 8 -> (code[b0 >> 4], code[b0 & 15],
    # code[b1 >> 4], code[b1 & 15]), a 1 MiB table.
    pairs = torch.arange(256, device=data.device)
    pairs = torch.stack((code[pairs >> 4], code[pairs & 15]), dim=1)
    quads = torch.arange(65536, device=data.device)
    quads = torch.cat((pairs[quads & 255], pairs[quads >> 8]), dim=1)
    out = torch.empty(count, dtype=dtype, device=data.device)
    step = max(blocksize, STEP // blocksize * blocksize)
    for start in range(0, count, step):
        stop = min(count, start + step)
        chunk = data[start // 2 : (stop + 1) // 2]
        even = chunk.numel() // 2 * 2
        values = quads.index_select(0, chunk[:even].view(torch.int16).int().bitwise_and_(0xFFFF)).reshape(-1)
        if even < chunk.numel():
            values = torch.cat((values, pairs[chunk[even:].int()].reshape(-1)))
        out[start:stop] = _scale_blocks(values[: stop - start], absmax, blocksize, start // blocksize)
    return out.reshape(shape)


def _scale_blocks(values: torch.Tensor, absmax: torch.Tensor, blocksize: int, first: int) -> torch.Tensor:
    """values (a run of whole blocks from block `first`, the last one possibly partial) x each block's absmax."""
    full = values.numel() // blocksize * blocksize
    blocks = full // blocksize
    values[:full].view(-1, blocksize).mul_(absmax[first : first + blocks, None])
    if full < values.numel():
        values[full:].mul_(absmax[first + blocks])
    return values


def _lift_8bit(tensors: dict[str, TensorInfo], context: LiftContext) -> list[QuantizedTensor]:
    found = []
    for name, info in tensors.items():
        if not name.endswith(".weight") or info.dtype != "I8":
            continue
        stem = name.removesuffix("weight")
        if stem + "SCB" not in tensors:
            raise context.missing(name, stem + "SCB")
        parts = {"weight": info, "scb": tensors[stem + "SCB"]}
        layout = tensors.get(stem + "weight_format")
        if layout is not None:
            parts["format"] = layout
            # 0 is "row", the only layout bitsandbytes >= 0.45 writes; older GPU tile layouts are not portable.
            if int(read_small(layout).reshape(-1)[0]) != 0:
                raise context.refuse(f"bitsandbytes int8 weight_format other than 'row' (of {name})")
        if info.dtype != "I8" or len(info.shape) != 2 or parts["scb"].shape != (info.shape[0],):
            raise context.bad(stem + "SCB", f"shape {list(parts['scb'].shape)} is not one scale per row of {name}")
        found.append(logical(name, "F32", info.shape, parts, _decode_8bit, context, NAME))
    return found


def _decode_8bit(read: dict[str, torch.Tensor]) -> torch.Tensor:
    # int8_vectorwise_dequant's `A * stats.view(-1, 1) * 7.874015718698502e-3`, in place.
    return read["weight"].to(torch.float32).mul_(read["scb"].to(torch.float32).view(-1, 1)).mul_(7.874015718698502e-3)


def quantize_nf4(
    weight: torch.Tensor, *, blocksize: int = 64, double_quant: bool = True, quant_type: str = "nf4"
) -> dict[str, torch.Tensor]:
    """--requantize: the tensors transformers saves for a Linear4bit weight, keyed by suffix ("" is the weight)."""
    bnb = require("bitsandbytes", "bitsandbytes")
    packed, state = bnb.functional.quantize_4bit(
        weight, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type
    )
    return {"": packed, **{f".{k}": v for k, v in state.as_dict(packed=True).items()}}
