"""`--requantize`: write the base's own format. Untouched quantized weights are copied as their stored bytes;
an edited one is merged in fp32 and quantized again by the format's reference quantizer, with new scales.

Done for FP8 with fp32 scales (blocks, per channel, per tensor: transformers' `Fp8Quantize` rule, amax / 448
per block) and for bitsandbytes 4-bit (NF4/FP4 with or without double quantization: `quantize_4bit` of the
fp32 merged weight, which is what PEFT's `Linear4bit.merge` stores). Everything else is refused by name.

One piece serves `merge --requantize` and `unmerge --requantize`: the command hands in how an edited weight's fp32
value is computed (its edits applied, or reverted), and the stored format, the stash and the encoders are shared.

The stored parts of an edited weight become planned outputs of their own: the weight's job quantizes and leaves
its companions' tensors in a stash, which the companions' reads take (the reader waits for them; they are the
next jobs, so the pipeline never waits on itself).
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
from collections.abc import Callable

import torch

from lora_cli.adapters.base import Workspace
from lora_cli.engine import apply_edits
from lora_cli.errors import NonFiniteError
from lora_cli.io.dtypes import SAFETENSORS_TO_TORCH
from lora_cli.io.safetensors_file import TensorInfo
from lora_cli.io.writer import OutputTensor
from lora_cli.plan import MergePlan, PlannedTensor
from lora_cli.quant import bnb, fp8
from lora_cli.quant.base import QuantizedTensor, UnsupportedQuantError

Encode = Callable[[torch.Tensor], dict[str, torch.Tensor]]  # merged fp32 weight -> stored tensors by name
# How a command computes an edited weight in working precision from its dequantized value: merge applies the
# edits (`apply_edits`), unmerge reverts them. The result is quantized once, from fp32.
Compute = Callable[[PlannedTensor, torch.Tensor, torch.device, Workspace], torch.Tensor]
# A bitsandbytes quant state is JSON in a uint8 tensor whose length must be known before the weight is computed:
# it is padded with spaces (valid JSON whitespace, which bitsandbytes' json.loads ignores) to the stored length
# plus this much room (a float's repr and the dtype name are all that vary).
STATE_ROOM = 48


class Stash:
    """Tensors an edited weight's job computed for its companions, handed over across the pipeline's threads."""

    def __init__(self) -> None:
        self._values: dict[str, torch.Tensor] = {}
        self._ready = threading.Condition()
        self._abandoned = False

    def put(self, values: dict[str, torch.Tensor]) -> None:
        with self._ready:
            self._values.update(values)
            self._ready.notify_all()

    def abandon(self) -> None:
        """The weight's job failed: a companion's read waiting for it gives up (the pipeline joins the reader)."""
        with self._ready:
            self._abandoned = True
            self._ready.notify_all()

    def take(self, name: str) -> torch.Tensor:
        with self._ready:
            self._ready.wait_for(lambda: name in self._values or self._abandoned, timeout=3600)
            if name not in self._values:
                raise RuntimeError(f"requantized part {name} was not computed (its weight's job failed)")
            return self._values.pop(name)


@dataclasses.dataclass(frozen=True)
class StashedPart(TensorInfo):
    """A stored part of an edited quantized weight, recomputed: reading it takes it from the stash."""

    stash: Stash | None = dataclasses.field(default=None, hash=False, compare=False, repr=False)

    @property
    def stored(self) -> bool:
        return False

    def dequantize(self) -> torch.Tensor:
        assert self.stash is not None
        return self.stash.take(self.name)


def requantize_plan(
    plan: MergePlan, compute: Compute = apply_edits, command: str = "merge"
) -> tuple[MergePlan, Callable]:
    """The plan with every quantized weight written in its input's format, and the transform that does it.

    `compute` gives an edited weight's new value from its dequantized one; `command` names the command in messages
    (merge reads a base, unmerge a merged checkpoint)."""
    quantization = plan.base.quantization
    if quantization is None:
        what = "base" if command == "merge" else "merged checkpoint"
        raise UnsupportedQuantError(
            f"--requantize needs a quantized {what}, and this one is not",
            path=plan.base.directory,
            fix=f"{command} without --requantize",
        )
    stash = Stash()
    encoders: dict[str, Encode] = {}
    tensors: list[PlannedTensor] = []
    for planned in plan.tensors:
        source = planned.source
        if not isinstance(source, QuantizedTensor):
            tensors.append(planned)
            continue
        if not planned.edits:  # every stored part copied as bytes
            tensors.extend(
                PlannedTensor(p.name, p, [], OutputTensor(p.name, p.dtype, p.shape)) for p in _in_file_order(source)
            )
            continue
        encode, outputs = _encoder(source, quantization.config, command)
        main, *companions = outputs
        encoders[planned.name] = encode
        tensors.append(
            PlannedTensor(planned.name, source, planned.edits, OutputTensor(main.name, main.dtype, main.shape))
        )
        for part in companions:
            if part.stored:
                tensors.append(PlannedTensor(part.name, part, [], OutputTensor(part.name, part.dtype, part.shape)))
            else:
                stashed = StashedPart(
                    part.name, part.dtype, part.shape, source.file, source.offset, part.nbytes, stash=stash
                )
                tensors.append(PlannedTensor(part.name, stashed, [], OutputTensor(part.name, part.dtype, part.shape)))
    new = dataclasses.replace(plan, tensors=tensors, keeps_quantization=True)

    def transform(
        planned: PlannedTensor, tensor: torch.Tensor, device: torch.device, workspace: Workspace, out: torch.Tensor
    ) -> torch.Tensor:
        try:
            merged = compute(planned, tensor, device, workspace).to("cpu", torch.float32)
            if not torch.isfinite(merged).all():  # checked here: a 4-bit output would hide it in its codes
                raise NonFiniteError(
                    f"{command}d tensor {planned.name} holds NaN or Inf",
                    path=", ".join(sorted({e.adapter.label for e in planned.edits})),
                    fix="the adapter is broken for this base",
                )
            parts = encoders[planned.name](merged)
        except BaseException:
            stash.abandon()
            raise
        stash.put({name: value for name, value in parts.items() if name != planned.name})
        return parts[planned.name]

    return new, transform


def _in_file_order(source: QuantizedTensor) -> list[TensorInfo]:
    return sorted(source.parts.values(), key=lambda p: (str(p.file), p.offset))


def _encoder(source: QuantizedTensor, qconfig: dict, command: str) -> tuple[Encode, list[TensorInfo]]:
    """How to quantize this weight again, and its outputs (the weight first): recomputed parts as TensorInfos
    with `stored` False, parts kept as they are (activation scales) as their stored TensorInfos."""
    if source.format == fp8.NAME:
        return _fp8_encoder(source, qconfig, command)
    if source.format == bnb.NAME and "state" in source.parts:
        return _nf4_encoder(source)
    variant = f"{source.format} int8" if source.format == bnb.NAME else source.format
    raise UnsupportedQuantError(
        f"--requantize of {variant} weights ({source.name}) is not supported",
        path=source.file,
        fix=f"{command} without --requantize to write the dequantized model, or requantize it with the format's tools",
    )


def _recomputed(info: TensorInfo, shape: tuple[int, ...] | None = None) -> TensorInfo:
    """A stored part that the edited weight's job computes again (same name and dtype; `shape` if it changes)."""
    shape = shape if shape is not None else info.shape
    nbytes = math.prod(shape) * SAFETENSORS_TO_TORCH[info.dtype].itemsize
    return _Recomputed(info.name, info.dtype, shape, info.file, info.offset, nbytes)


@dataclasses.dataclass(frozen=True)
class _Recomputed(TensorInfo):
    @property
    def stored(self) -> bool:
        return False


def _fp8_encoder(source: QuantizedTensor, qconfig: dict, command: str) -> tuple[Encode, list[TensorInfo]]:
    weight, scale = source.parts["weight"], source.parts["scale"]
    if weight.dtype != "F8_E4M3" or scale.dtype != "F32":
        raise UnsupportedQuantError(
            f"--requantize of FP8 with {weight.dtype} weights and {scale.dtype} scales ({source.name}) is not "
            "supported (E4M3 with fp32 scales is)",
            path=source.file,
            fix=f"{command} without --requantize to write the dequantized model",
        )
    grid = fp8.scale_grid(weight.shape, scale.shape, fp8.block_size(qconfig))
    rows, cols = weight.shape[-2:]
    block = None if grid == (rows, cols) else grid

    def encode(merged: torch.Tensor) -> dict[str, torch.Tensor]:
        quantized, inverse = fp8.quantize_blocks(merged, block)
        return {weight.name: quantized, scale.name: inverse.reshape(scale.shape)}

    others = [p for role, p in source.parts.items() if role not in ("weight", "scale")]
    return encode, [_recomputed(weight), _recomputed(scale), *others]


def _nf4_encoder(source: QuantizedTensor) -> tuple[Encode, list[TensorInfo]]:
    from lora_cli.quant.base import read_small

    state_info = source.parts["state"]
    stored_json = read_small(state_info).numpy().tobytes().rstrip(b" ")
    state = json.loads(stored_json.decode("utf-8"))
    double = "nested_blocksize" in state
    # From the JSON without its padding: a state padded by an earlier --requantize does not grow on each round trip.
    length = len(stored_json) + STATE_ROOM
    name = source.name

    def encode(merged: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = bnb.quantize_nf4(
            merged, blocksize=state["blocksize"], double_quant=double, quant_type=state["quant_type"]
        )
        out = {name + suffix: value for suffix, value in parts.items()}
        key = f"{name}.quant_state.bitsandbytes__{state['quant_type']}"
        text = out[key].numpy().tobytes().rstrip(b" ")
        out[key] = torch.frombuffer(bytearray(text.ljust(length, b" ")), dtype=torch.uint8)
        return out

    outputs = [_recomputed(source.parts["weight"])]
    for role, part in source.parts.items():
        if role == "weight":
            continue
        outputs.append(_recomputed(part, shape=(length,) if role == "state" else None))
    return encode, outputs
