"""HRA as PEFT defines it (`peft/tuners/hra/layer.py`): the weight times a product of r Householder reflections.

H = prod_i (I - 2 u_i u_i^T) over the normalised columns of `hra_u` (or, with `apply_GS`, I - 2 U U^T after a
Gram-Schmidt pass); the merge is W' = W.view(out, -1) @ H in fp32, as PEFT's `torch.mm(weight, delta)`, for
Linear and square-kernel Conv2d weights. Undo solves with H.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from lora_cli.adapters.base import Adapter, AdapterKind, AdapterModule, EditContext, Shape, TensorEdit
from lora_cli.adapters.params import refuse_weight, require


def householder(u: torch.Tensor, gram_schmidt: bool) -> torch.Tensor:
    """PEFT's `get_delta_weight`, operation for operation."""
    size, rank = u.shape
    if gram_schmidt:
        basis = [(u[:, 0] / u[:, 0].norm()).view(-1, 1)]
        for i in range(1, rank):
            ui = u[:, i].view(-1, 1)
            for j in range(i):
                ui = ui - (basis[j].t() @ ui) * basis[j]
            basis.append((ui / ui.norm()).view(-1, 1))
        stacked = torch.cat(basis, dim=1)
        return torch.eye(size, device=u.device, dtype=u.dtype) - 2 * stacked @ stacked.t()
    u = u / u.norm(dim=0)
    weight = torch.eye(size, device=u.device, dtype=u.dtype)
    for i in range(rank):
        ui = u[:, i].view(-1, 1)
        weight = weight - 2 * weight @ ui @ ui.t()
    return weight


class HraEdit(TensorEdit):
    kind = "hra"

    def __init__(self, adapter: Adapter, target: str, key: str) -> None:
        super().__init__(adapter, target)
        self.key = key
        self.gram_schmidt = bool(adapter.config.get("apply_GS"))

    def adapter_keys(self) -> list[str]:
        return [self.key]

    def check(self, shape: Shape) -> str | None:
        size = self.adapter.weights.shape(self.key)[0]
        square = len(shape) == 2 or (len(shape) == 4 and shape[2] == shape[3])
        if square and math.prod(shape[1:]) == size:
            return None
        return f"{self.target}: HRA reflections of size {size} vs base {tuple(shape)}"

    def apply(self, weight: torch.Tensor, ctx: EditContext) -> torch.Tensor:
        reflection = householder(ctx.load(self.key), self.gram_schmidt)
        return torch.mm(weight.reshape(weight.shape[0], -1), reflection).reshape(weight.shape)

    def revert(self, merged: torch.Tensor, ctx: EditContext, base: torch.Tensor | None = None) -> torch.Tensor:
        reflection = householder(ctx.load(self.key), self.gram_schmidt)
        flat = merged.reshape(merged.shape[0], -1)
        return torch.linalg.solve(reflection, flat, left=False).reshape(merged.shape)

    def describe(self) -> str:
        return f"hra r={self.adapter.weights.shape(self.key)[1]}"


class Hra(AdapterKind):
    peft_type = "HRA"
    param_roots = frozenset({"hra_u"})

    def check_adapter(self, adapter: Adapter) -> None:
        refuse_weight(adapter, "HRA", "an HRA reflection has no delta to scale")

    def module_edits(
        self, adapter: Adapter, module: AdapterModule, base_shape: Callable[[str], Shape | None]
    ) -> list[TensorEdit]:
        (key,) = require(adapter, module, "hra_u")
        return [HraEdit(adapter, f"{module.path}.weight", key)]
