"""compressed-tensors checkpoints (llm-compressor): `float-quantized`, `int-quantized`, `naive-quantized` and
`pack-quantized`, dequantized by the compressed-tensors library's own compressor for the module's format.

The library's `decompress` returns the scale's dtype (bf16 or fp16 in llm-compressor checkpoints).
"""

from __future__ import annotations

import re

import torch

from lora_cli.io.dtypes import TORCH_TO_SAFETENSORS
from lora_cli.io.safetensors_file import TensorInfo
from lora_cli.quant.base import LiftContext, QuantizedTensor, logical, read_small, require

NAME = "compressed-tensors"
DENSE_FORMATS = ("float-quantized", "int-quantized", "naive-quantized")
PACKED = "pack-quantized"
# Auxiliary tensors of a quantized module: consumed whether or not the dequantization reads them.
AUXILIARY = (
    "weight_scale",
    "weight_zero_point",
    "weight_shape",
    "weight_global_scale",
    "input_scale",
    "input_zero_point",
    "input_global_scale",
    "output_scale",
    "output_zero_point",
)


def lift(tensors: dict[str, TensorInfo], context: LiftContext) -> list[QuantizedTensor]:
    groups = context.qconfig.get("config_groups") or {}
    if not isinstance(groups, dict) or not groups:
        raise context.bad("quantization_config.config_groups", "is missing or empty")
    found = []
    for name, info in tensors.items():
        stem, packed = _quantized_stem(name)
        if stem is None or (stem + "weight_scale" not in tensors and not packed):
            continue
        group = _group_for(stem.rstrip("."), groups, context)
        fmt = group.get("format") or context.qconfig.get("format")
        if fmt not in (*DENSE_FORMATS, PACKED):
            raise context.refuse(f"compressed-tensors format {fmt!r} (of {stem}weight)")
        if packed != (fmt == PACKED):
            raise context.bad(name, f"is stored as {'packed' if packed else 'dense'} but the format is {fmt}")
        if f"{stem}weight_g_idx" in tensors:
            raise context.refuse(f"compressed-tensors activation ordering (weight_g_idx, of {stem}weight)")
        needed = ["weight_scale", *(["weight_shape"] if packed else [])]
        for part in needed:
            if stem + part not in tensors:
                raise context.missing(stem + "weight", stem + part)
        weights = group.get("weights") or {}
        if weights.get("symmetric") is False and stem + "weight_zero_point" not in tensors:
            raise context.missing(stem + "weight", stem + "weight_zero_point")
        parts = {"weight": info}
        parts.update({p: tensors[stem + p] for p in AUXILIARY if stem + p in tensors})
        scheme = _scheme(group, context)
        shape = tuple(int(d) for d in read_small(parts["weight_shape"]).tolist()) if packed else info.shape
        scale = parts["weight_scale"]
        if scale.torch_dtype not in TORCH_TO_SAFETENSORS or not scale.torch_dtype.is_floating_point:
            raise context.bad(scale.name, f"scale dtype {scale.dtype} is not a float")

        def decode(read: dict[str, torch.Tensor], fmt: str = fmt, scheme: object = scheme) -> torch.Tensor:
            return _decompress(read, fmt, scheme)

        found.append(logical(stem + "weight", scale.dtype, shape, parts, decode, context, NAME))
    return found


def _quantized_stem(name: str) -> tuple[str | None, bool]:
    if name.endswith(".weight_packed"):
        return name.removesuffix("weight_packed"), True
    if name.endswith(".weight"):
        return name.removesuffix("weight"), False
    return None, False


def _group_for(module: str, groups: dict, context: LiftContext) -> dict:
    """The config group whose targets name this module; with one group, that one (its targets are layer classes,
    which a checkpoint's tensor names do not tell apart)."""
    if len(groups) == 1:
        return next(iter(groups.values()))
    named = [g for g in groups.values() if any(_names(t, module) for t in g.get("targets") or [])]
    if len(named) == 1:
        return named[0]
    raise context.refuse(
        f"compressed-tensors with {len(groups)} config_groups whose targets do not single out {module}"
    )


def _names(target: str, module: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return target == module or module.endswith("." + target)


def _scheme(group: dict, context: LiftContext) -> object:
    require("compressed_tensors", NAME)
    from compressed_tensors.quantization import QuantizationScheme

    try:
        return QuantizationScheme.model_validate({k: v for k, v in group.items() if k != "format"})
    except ValueError as exc:
        raise context.bad("quantization_config.config_groups", f"is not a valid scheme ({exc})") from None


def _decompress(read: dict[str, torch.Tensor], fmt: str, scheme: object) -> torch.Tensor:
    from compressed_tensors.compressors import BaseCompressor

    compressor = BaseCompressor.get_value_from_registry(fmt)
    state = {"weight_packed" if fmt == PACKED else "weight": read["weight"]}
    state.update({k: v for k, v in read.items() if k != "weight"})
    return compressor.decompress(state, scheme)["weight"]
