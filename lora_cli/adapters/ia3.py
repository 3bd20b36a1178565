"""(IA)^3 as PEFT defines it (`peft/tuners/ia3/layer.py`): a learned vector scales the weight's output rows, or
its input columns for `feedforward_modules`, and (output case only) the bias.

The merge is a product, not a sum: W * l in fp32, rounded once, as PEFT's `torch.mul(weight, ia3_l).to(dtype)`.
`ADAPTER@w` scales the change, W * (1 + w (l - 1)), so w=0 is the base and w=1 is PEFT's merge. Undo divides.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lora_cli.adapters.base import Adapter, AdapterKind, AdapterModule, EditContext, Shape, TensorEdit
from lora_cli.adapters.params import require
from lora_cli.errors import NotRevertibleError
from lora_cli.patterns import full_match


class Ia3Edit(TensorEdit):
    """Multiply the base weight (or bias) by the (IA)^3 vector, broadcast along the scaled axis."""

    kind = "ia3"

    def __init__(self, adapter: Adapter, target: str, key: str, feedforward: bool, is_bias: bool) -> None:
        super().__init__(adapter, target)
        self.key = key
        self.feedforward = feedforward
        self.is_bias = is_bias
        self.fan_in_fan_out = bool(adapter.config.get("fan_in_fan_out"))

    def adapter_keys(self) -> list[str]:
        return [self.key]

    def _axis(self, shape: Shape) -> int:
        """Which axis of the base tensor the vector runs along."""
        if self.is_bias:
            return 0
        axis = 1 if self.feedforward else 0
        return 1 - axis if self.fan_in_fan_out and len(shape) == 2 else axis

    def check(self, shape: Shape) -> str | None:
        size = 1
        for dim in self.adapter.weights.shape(self.key):
            size *= dim
        axis = self._axis(shape)
        if len(shape) <= axis or shape[axis] != size:
            return f"{self.target}: (IA)^3 vector of {size} vs base {tuple(shape)}"
        return None

    def factor(self, shape: Shape, ctx: EditContext) -> torch.Tensor:
        vector = ctx.load(self.key).reshape(-1)
        if self.adapter.weight != 1.0:
            vector = 1 + self.adapter.weight * (vector - 1)
        view = [1] * len(shape)
        view[self._axis(shape)] = -1
        return vector.view(view)

    def apply(self, weight: torch.Tensor, ctx: EditContext) -> torch.Tensor:
        return torch.mul(weight, self.factor(tuple(weight.shape), ctx))

    def revert(self, merged: torch.Tensor, ctx: EditContext, base: torch.Tensor | None = None) -> torch.Tensor:
        factor = self.factor(tuple(merged.shape), ctx)
        if bool((factor == 0).any()):
            raise NotRevertibleError(
                f"{self.target}: the (IA)^3 vector has zeros, so the merge erased those rows",
                path=self.adapter.ref,
                fix="pass --base BASE",
            )
        return torch.div(merged, factor)


def is_feedforward(adapter: Adapter, module_path: str) -> bool:
    """PEFT's rule: a string is a full regex match, a list matches by name suffix."""
    spec = adapter.config.get("feedforward_modules")
    if isinstance(spec, str):
        return full_match(spec, module_path, key="feedforward_modules", path=adapter.config_path)
    if isinstance(spec, list):
        return any(module_path.endswith(name) for name in spec)
    return False


class Ia3(AdapterKind):
    peft_type = "IA3"
    param_roots = frozenset({"ia3_l"})

    def module_edits(
        self, adapter: Adapter, module: AdapterModule, base_shape: Callable[[str], Shape | None]
    ) -> list[TensorEdit]:
        (key,) = require(adapter, module, "ia3_l")
        feedforward = is_feedforward(adapter, module.path)
        edits: list[TensorEdit] = [Ia3Edit(adapter, f"{module.path}.weight", key, feedforward, is_bias=False)]
        if not feedforward and base_shape(f"{module.path}.bias") is not None:
            edits.append(Ia3Edit(adapter, f"{module.path}.bias", key, feedforward, is_bias=True))
        return edits
