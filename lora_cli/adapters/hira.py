"""HiRA as PEFT defines it (`peft/tuners/hira/layer.py`): a Hadamard (element-wise) update, W' = W + W * (B @ A).

The change scales each weight by its own factor, so it is computed on the base tensor: PEFT's `_merge` forms
B @ A in fp32 (transposed for `fan_in_fan_out` layers and embeddings), rounds it to the base dtype, then
W + W * delta in that dtype. `ADAPTER@w` scales the change: W (1 + w (B @ A)), undone by a division.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lora_cli.adapters.base import Adapter, AdapterKind, AdapterModule, EditContext, Shape, TensorEdit
from lora_cli.adapters.params import missing_params


class HiraEdit(TensorEdit):
    kind = "hira"

    def __init__(self, adapter: Adapter, target: str, a_key: str, b_key: str, transposed: bool) -> None:
        super().__init__(adapter, target)
        self.a_key, self.b_key, self.transposed = a_key, b_key, transposed
        self.rank = adapter.weights.shape(a_key)[0]

    def adapter_keys(self) -> list[str]:
        return [self.a_key, self.b_key]

    def check(self, shape: Shape) -> str | None:
        a, b = self.adapter.weights.shape(self.a_key), self.adapter.weights.shape(self.b_key)
        product = (b[0], a[1])
        if len(shape) != 2 or len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            return f"{self.target}: HiRA adapts linear layers and embeddings, base is {tuple(shape)}"
        if (product[::-1] if self.transposed else product) != tuple(shape):
            return f"{self.target}: HiRA B @ A is {product} vs base {tuple(shape)}"
        return None

    def factor(self, ctx: EditContext) -> torch.Tensor:
        """w * (B @ A) in the base tensor's layout."""
        product = ctx.load(self.b_key) @ ctx.load(self.a_key)
        product = product.T if self.transposed else product
        return product if self.adapter.weight == 1.0 else product * self.adapter.weight

    def apply(self, weight: torch.Tensor, ctx: EditContext) -> torch.Tensor:
        # PEFT rounds B @ A to the base dtype, then multiplies and adds in it: the same roundings, replayed.
        factor = self.factor(ctx)
        if ctx.stored_dtype is None:
            return weight + weight * factor
        factor = factor.to(ctx.stored_dtype).to(weight.dtype)
        return weight + (weight * factor).to(ctx.stored_dtype).to(weight.dtype)

    def revert(self, merged: torch.Tensor, ctx: EditContext, base: torch.Tensor | None = None) -> torch.Tensor:
        return merged / (1 + self.factor(ctx))

    def describe(self) -> str:
        return f"hira r={self.rank}"


class Hira(AdapterKind):
    peft_type = "HIRA"
    param_roots = frozenset({"hira_A", "hira_B", "hira_embedding_A", "hira_embedding_B"})

    def module_edits(
        self, adapter: Adapter, module: AdapterModule, base_shape: Callable[[str], Shape | None]
    ) -> list[TensorEdit]:
        fan_in_fan_out = bool(adapter.config.get("fan_in_fan_out"))
        if module.has("hira_A") and module.has("hira_B"):
            a, b, transposed = module.params["hira_A"], module.params["hira_B"], fan_in_fan_out
        elif module.has("hira_embedding_A") and module.has("hira_embedding_B"):
            a, b, transposed = module.params["hira_embedding_A"], module.params["hira_embedding_B"], True
        else:
            raise missing_params(adapter, module.path, list(module.params), "hira_A and hira_B")
        return [HiraEdit(adapter, f"{module.path}.weight", a, b, transposed)]
