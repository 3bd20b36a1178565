"""Tensor-name endings that only quantized checkpoints have, and the format they betray: a checkpoint holding them
without a quantization_config is refused instead of being copied as if its integers were weights. No torch here:
every checkpoint's opening checks these names."""

from __future__ import annotations

MARKERS: dict[str, str] = {
    ".weight_scale_inv": "fp8",
    ".SCB": "bitsandbytes int8",
    ".weight.absmax": "bitsandbytes 4-bit",
    ".weight.quant_map": "bitsandbytes 4-bit",
    ".weight_packed": "compressed-tensors",
    ".qweight": "gptq/awq",
    "_blocks": "mxfp4",
}
