"""RoAd as PEFT defines it (`peft/tuners/road/layer.py`): each pair of output units (i, i + group/2 within a
group) is rotated and scaled by a learned 2-D rotation, applied to the weight's rows and to the bias.

The merge is W' = R @ W and b' = R @ b, with R built by PEFT's `_get_delta_weight` for the `road_1`, `road_2` or
`road_4` variant, in fp32. PEFT rounds R to the base dtype before the product; in fp32 the two agree bit for bit.
Undo solves with R.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lora_cli.adapters.base import Adapter, AdapterKind, AdapterModule, EditContext, Shape, TensorEdit
from lora_cli.adapters.params import config_number, refuse_weight, require
from lora_cli.errors import InputError

PARAMS_PER_UNIT = {"road_1": 0.5, "road_2": 1, "road_4": 2}


def columns(variant: str, group: int, theta: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's `_prepare_cols`: the diagonal and the rotated entries of R."""
    if variant == "road_1":
        theta = theta.reshape(-1, group // 2).repeat_interleave(2, dim=0).flatten()
        alpha = alpha.reshape(-1, group // 2).repeat_interleave(2, dim=0).flatten()
        return alpha * theta.cos(), alpha * theta.sin()
    if variant == "road_2":
        return alpha * theta.cos(), alpha * theta.sin()
    theta, alpha = theta.reshape(-1, 2, group), alpha.reshape(-1, 2, group)
    return alpha[:, 0, :].flatten() * theta[:, 0, :].cos().flatten(), alpha[:, 1, :].flatten() * theta[
        :, 1, :
    ].sin().flatten()


def rotation(variant: str, group: int, theta: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """PEFT's `_get_delta_weight`: the (out, out) matrix R."""
    first, second = columns(variant, group, theta, alpha)
    matrix = torch.diag(first)
    size = second.shape[0]
    swapped = second.reshape(-1, 2, group // 2)[:, [1, 0], :].flatten()
    rotated = torch.diag(swapped).reshape(-1, 2, group // 2, size)[:, [1, 0], :, :]
    rotated[:, 0, :, :] *= -1
    matrix += rotated.reshape(size, size)
    return matrix


class RoadEdit(TensorEdit):
    kind = "road"

    def __init__(self, adapter: Adapter, target: str, theta: str, alpha: str, variant: str, group: int) -> None:
        super().__init__(adapter, target)
        self.theta, self.alpha, self.variant, self.group = theta, alpha, variant, group

    def adapter_keys(self) -> list[str]:
        return [self.theta, self.alpha]

    def check(self, shape: Shape) -> str | None:
        size = self.adapter.weights.shape(self.theta)[0]
        if len(shape) in (1, 2) and shape[0] % self.group == 0 and size == shape[0] * PARAMS_PER_UNIT[self.variant]:
            return None
        return f"{self.target}: RoAd {self.variant} with {size} angles, group {self.group} vs base {tuple(shape)}"

    def _matrix(self, ctx: EditContext) -> torch.Tensor:
        return rotation(self.variant, self.group, ctx.load(self.theta), ctx.load(self.alpha))

    def apply(self, weight: torch.Tensor, ctx: EditContext) -> torch.Tensor:
        return torch.matmul(self._matrix(ctx), weight)

    def revert(self, merged: torch.Tensor, ctx: EditContext, base: torch.Tensor | None = None) -> torch.Tensor:
        matrix = self._matrix(ctx)
        column = merged.dim() == 1
        restored = torch.linalg.solve(matrix, merged.unsqueeze(1) if column else merged)
        return restored.squeeze(1) if column else restored

    def describe(self) -> str:
        return f"road {self.variant} group={self.group}"


class Road(AdapterKind):
    peft_type = "ROAD"
    param_roots = frozenset({"road_theta", "road_alpha"})

    def check_adapter(self, adapter: Adapter) -> None:
        refuse_weight(adapter, "RoAd", "a RoAd rotation has no delta to scale")
        if _variant(adapter) not in PARAMS_PER_UNIT:
            raise InputError(f"unknown RoAd variant {_variant(adapter)!r}", path=adapter.config_path)

    def module_edits(
        self, adapter: Adapter, module: AdapterModule, base_shape: Callable[[str], Shape | None]
    ) -> list[TensorEdit]:
        group = int(config_number(adapter, "group_size", 64))
        theta, alpha = require(adapter, module, "road_theta", "road_alpha")
        return [
            RoadEdit(adapter, f"{module.path}.{name}", theta, alpha, _variant(adapter), group)
            for name in ("weight", "bias")
            if name == "weight" or base_shape(f"{module.path}.bias") is not None
        ]


def _variant(adapter: Adapter) -> str:
    return str(adapter.config.get("variant", "road_1"))
