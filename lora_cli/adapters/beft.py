"""BEFT as PEFT defines it (`peft/tuners/beft/layer.py`): a learned vector added to each targeted layer's bias.

bias' = bias + beft_bias.squeeze(); PEFT refuses to merge into a layer without a bias, and so does loractl.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lora_cli.adapters.additive import AdditiveEdit
from lora_cli.adapters.base import Adapter, AdapterKind, AdapterModule, EditContext, Shape, TensorEdit
from lora_cli.adapters.params import require
from lora_cli.errors import AdapterMismatchError


class BeftEdit(AdditiveEdit):
    kind = "beft"

    def __init__(self, adapter: Adapter, target: str, key: str) -> None:
        super().__init__(adapter, target, [key], f"{adapter.weights.shape(key)[-1]} biases")
        self.key = key

    def expected_shape(self) -> Shape:
        return (self.adapter.weights.shape(self.key)[-1],)

    def check(self, shape: Shape) -> str | None:
        if len(shape) != 1:
            return f"{self.target}: BEFT adds to a bias, base is {tuple(shape)}"
        return super().check(shape)

    def peft_delta(self, shape: Shape, ctx: EditContext) -> torch.Tensor:
        return ctx.load(self.key).squeeze()


class Beft(AdapterKind):
    peft_type = "BEFT"
    param_roots = frozenset({"beft_bias"})

    def module_edits(
        self, adapter: Adapter, module: AdapterModule, base_shape: Callable[[str], Shape | None]
    ) -> list[TensorEdit]:
        (key,) = require(adapter, module, "beft_bias")
        target = f"{module.path}.bias"
        if base_shape(target) is None and base_shape(f"{module.path}.weight") is not None:
            raise AdapterMismatchError(
                f"{module.path} has no bias, so its BEFT bias cannot be merged (PEFT refuses it too)",
                path=adapter.weights.path,
                fix="train BEFT only on layers with a bias",
            )
        return [BeftEdit(adapter, target, key)]
