"""Was the adapter trained on a quantized base, and is the base given one? QLoRA learns a delta for
dequant(Q(W)), so merging it into the original 16-bit W (or a plain adapter into a quantized base) does not
give the model that was trained; README's "Quantized bases" measures by how much."""

from __future__ import annotations

import re

from lora_cli.adapters.base import Adapter
from lora_cli.adapters.lineage import Named, names_base
from lora_cli.quant.view import Quantization

# Name parts that Hub repos of quantized models carry ("unsloth/llama-3-8b-bnb-4bit", "Qwen/Qwen3-8B-FP8").
QUANTIZED_NAME = re.compile(
    r"(^|[-_./])(bnb|4bit|8bit|nf4|fp4|fp8|int4|int8|awq|gptq|mxfp4|w4a16|w8a8|w8a16)($|[-_./])"
)


def names_quantized(name: str) -> bool:
    return QUANTIZED_NAME.search(name.lower()) is not None


def quantization_warnings(
    quantization: Quantization | None, adapters: list[Adapter], base: Named | None = None
) -> list[str]:
    """`base`: the names the base goes by. An adapter that names it was trained on this very checkpoint, loaded
    dequantized (gpt-oss ships only in MXFP4 and PEFT trains on its dequantized experts): no quantization gap."""
    messages = []
    for adapter in adapters:
        trained_on = adapter.config.get("base_model_name_or_path")
        if not isinstance(trained_on, str) or not trained_on.strip():
            continue
        if quantization is None and names_quantized(trained_on):
            messages.append(
                f"adapter {adapter.label} was trained on {trained_on!r}, a quantized model, but the base given is "
                "not quantized: its delta was learned for the dequantized weights, so merging it into these "
                "weights does not reproduce the trained model; pass the quantized base it was trained on"
            )
        this_base = base is not None and names_base(trained_on, base)
        if quantization is not None and not names_quantized(trained_on) and not this_base:
            messages.append(
                f"adapter {adapter.label} was trained on {trained_on!r}, which names no quantized model, but the "
                f"base given is quantized ({quantization.method}): it is merged into the dequantized weights, "
                "which differ from the ones it was trained on by the quantization error"
            )
    return messages
