"""Every quantization format loractl reads, keyed by config.json's `quantization_config.quant_method`."""

from __future__ import annotations

from collections.abc import Callable

from lora_cli.io.safetensors_file import TensorInfo
from lora_cli.quant import bnb, compressed, fp8, gptq, mxfp4
from lora_cli.quant.base import LiftContext, QuantizedTensor

Lift = Callable[[dict[str, TensorInfo], LiftContext], list[QuantizedTensor]]

FORMATS: dict[str, Lift] = {
    "fp8": fp8.lift,
    "fbgemm_fp8": fp8.lift,
    "bitsandbytes": bnb.lift,
    "compressed-tensors": compressed.lift,
    "gptq": gptq.lift_gptq,
    "awq": gptq.lift_awq,
    "mxfp4": mxfp4.lift,
}
