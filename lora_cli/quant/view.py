"""A checkpoint as its logical tensors: each quantized weight one `QuantizedTensor`, its auxiliaries consumed."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lora_cli.io.checkpoint import CheckpointIndex
from lora_cli.io.safetensors_file import TensorInfo
from lora_cli.quant.markers import MARKERS

if TYPE_CHECKING:
    from lora_cli.quant.base import QuantizedTensor


@dataclass(frozen=True)
class Quantization:
    """What the base's quantization was, for the written config and the summary."""

    method: str
    config: dict
    compute_dtype: str  # safetensors spelling of the dtype dequantized tensors are written in by default
    quantized: tuple[str, ...]  # logical names
    consumed: tuple[str, ...]  # stored auxiliary tensors that have no place in a dequantized checkpoint


def quantization_config(config: dict | None) -> dict | None:
    if not config:
        return None
    found = config.get("quantization_config")
    if found is None and isinstance(config.get("text_config"), dict):
        found = config["text_config"].get("quantization_config")
    return found if isinstance(found, dict) else None


def compute_dtype(config: dict | None) -> str:
    """The dtype the model computes in: config's dtype/torch_dtype (also under text_config), else bf16."""
    from lora_cli.quant.base import safetensors_dtype

    config = config or {}
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    for source in (config, text):
        for key in ("dtype", "torch_dtype"):
            if source.get(key):
                return safetensors_dtype(source[key])
    return "BF16"


def logical_index(index: CheckpointIndex) -> CheckpointIndex:
    """The checkpoint with quantized weights replaced by their logical tensors, in file order; a plain
    checkpoint unchanged. Refuses a format or variant it does not read, naming it, and quantized-looking
    tensors with no quantization_config."""
    config = index.config()
    qconfig = quantization_config(config)
    if qconfig is None:
        _refuse_unannounced(index)
        return index
    # The formats (and torch) only for a quantized checkpoint: reading a plain header stays torch-free.
    from lora_cli.quant.base import LiftContext
    from lora_cli.quant.registry import FORMATS

    method = str(qconfig.get("quant_method", ""))
    lift = FORMATS.get(method)
    context = LiftContext(index.directory, qconfig, compute_dtype(config))
    if lift is None:
        raise context.refuse(f"quantization_config.quant_method {method!r}")
    found = lift(index.tensors, context)
    consumed = {part.name for tensor in found for part in tensor.parts.values()}
    # Each logical tensor takes the place of its first stored part (the weight), keeping the shards' order.
    anchors: dict[str, QuantizedTensor] = {next(iter(t.parts.values())).name: t for t in found}
    tensors: dict[str, TensorInfo] = {}
    for name, info in index.tensors.items():
        if name in anchors:
            logical = anchors[name]
            if logical.name in tensors or (logical.name in index.tensors and logical.name not in consumed):
                raise context.bad(logical.name, "is both a stored tensor and a quantized weight's name")
            tensors[logical.name] = logical
        elif name not in consumed:
            tensors[name] = info
    quantization = Quantization(
        method=method,
        config=qconfig,
        compute_dtype=context.compute_dtype,
        quantized=tuple(t.name for t in found),
        consumed=tuple(sorted(consumed - {t.name for t in found})),
    )
    return dataclasses.replace(index, tensors=tensors, quantization=quantization)


def _refuse_unannounced(index: CheckpointIndex) -> None:
    for name in index.tensors:
        for suffix, fmt in MARKERS.items():
            if name.endswith(suffix) and (suffix != "_blocks" or name[: -len(suffix)] + "_scales" in index.tensors):
                from lora_cli.quant.base import UnsupportedQuantError

                raise UnsupportedQuantError(
                    f"holds {fmt} quantized tensors ({name}) but config.json has no quantization_config",
                    path=index.directory,
                    fix="put the model's config.json (with its quantization_config) next to the weights",
                )
