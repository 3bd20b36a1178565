"""SHiRA as PEFT defines it (`peft/tuners/shira/layer.py`): a sparse delta, its values at saved (row, col) indices.

delta = sparse(shira_indices, shira_weight * 1.0, (out, in)); PEFT's scaling is 1 for every loaded adapter.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lora_cli.adapters.additive import AdditiveEdit
from lora_cli.adapters.base import Adapter, AdapterKind, AdapterModule, EditContext, Shape, TensorEdit
from lora_cli.adapters.params import require
from lora_cli.errors import InputError


class ShiraEdit(AdditiveEdit):
    kind = "shira"

    def __init__(self, adapter: Adapter, target: str, weight_key: str, index_key: str) -> None:
        count = adapter.weights.shape(weight_key)[0]
        super().__init__(adapter, target, [weight_key, index_key], f"{count} entries")
        self.weight_key, self.index_key = weight_key, index_key

    def check(self, shape: Shape) -> str | None:
        indices = self.adapter.weights.shape(self.index_key)
        weights = self.adapter.weights.shape(self.weight_key)
        if len(shape) == 2 and indices == (2, weights[0]):
            return None
        return f"{self.target}: SHiRA indices {indices} and values {weights} vs base {tuple(shape)}"

    def peft_delta(self, shape: Shape, ctx: EditContext) -> torch.Tensor:
        indices = ctx.load(self.index_key).long()
        if bool((indices < 0).any() or (indices[0] >= shape[0]).any() or (indices[1] >= shape[1]).any()):
            raise InputError(
                f"{self.target}: a SHiRA index lies outside the base shape {tuple(shape)}",
                path=self.adapter.weights.path,
                fix="the adapter belongs to another base, or its file is corrupt",
            )
        values = ctx.load(self.weight_key) * 1.0
        return torch.sparse_coo_tensor(indices, values, tuple(shape), check_invariants=True).to_dense()


class Shira(AdapterKind):
    peft_type = "SHIRA"
    param_roots = frozenset({"shira_weight", "shira_indices"})

    def module_edits(
        self, adapter: Adapter, module: AdapterModule, base_shape: Callable[[str], Shape | None]
    ) -> list[TensorEdit]:
        values, indices = require(adapter, module, "shira_weight", "shira_indices")
        return [ShiraEdit(adapter, f"{module.path}.weight", values, indices)]
