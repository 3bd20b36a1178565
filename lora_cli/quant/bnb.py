"""bitsandbytes checkpoints saved by transformers: 4-bit NF4/FP4 (with or without double quantization) and
LLM.int8() (`SCB`), dequantized by bitsandbytes itself, as PEFT's `dequantize_bnb_weight` does.

4-bit: `dequantize_4bit` returns the quant state's dtype (the dtype the weight had when quantized); int8:
`int8_vectorwise_dequant` returns fp32. The delta is then added in fp32 and rounded once.
"""

from __future__ import annotations

import json

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
    require("bitsandbytes", NAME)  # before anything is written: its dequantization is the reference
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
        found.append(logical(name, TORCH_TO_SAFETENSORS[dtype], tuple(shape), parts, _decode_4bit, context, NAME))
    return found


def _unpack_state(raw: torch.Tensor, name: str, context: LiftContext) -> dict:
    try:
        state = json.loads(bytes(raw.numpy().tobytes()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise context.bad(name, "quant state is not the JSON bitsandbytes writes") from None
    if not isinstance(state, dict):
        raise context.bad(name, "quant state is not a JSON object")
    return state


def _decode_4bit(read: dict[str, torch.Tensor]) -> torch.Tensor:
    bnb = require("bitsandbytes", "bitsandbytes")
    state_key = "quant_state.bitsandbytes__" + ("nf4" if _is_nf4(read["state"]) else "fp4")
    parts = {state_key: read["state"]}
    parts.update({role: read[role] for role in FOUR_BIT_PARTS if role in read})
    quant_state = bnb.functional.QuantState.from_dict(parts, device=torch.device("cpu"))
    return bnb.functional.dequantize_4bit(read["weight"], quant_state)


def _is_nf4(state: torch.Tensor) -> bool:
    return json.loads(state.numpy().tobytes().decode("utf-8")).get("quant_type") == "nf4"


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
    bnb = require("bitsandbytes", "bitsandbytes")
    return bnb.functional.int8_vectorwise_dequant(read["weight"], read["scb"].to(torch.float32))


def quantize_nf4(
    weight: torch.Tensor, *, blocksize: int = 64, double_quant: bool = True, quant_type: str = "nf4"
) -> dict[str, torch.Tensor]:
    """--requantize: the tensors transformers saves for a Linear4bit weight, keyed by suffix ("" is the weight)."""
    bnb = require("bitsandbytes", "bitsandbytes")
    packed, state = bnb.functional.quantize_4bit(
        weight, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type
    )
    return {"": packed, **{f".{k}": v for k, v in state.as_dict(packed=True).items()}}
