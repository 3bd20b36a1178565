"""Super-Tuning (and its LoRA hybrid, Supra) as PEFT defines it (`peft/tuners/supertuning/layer.py`): learned values
at a sparse set of weight positions, plus an optional LoRA.

PEFT's `merge`: the values are rounded to the base dtype and scatter-added at their flat positions (in the base
dtype), then (alpha / r) * (B @ A), computed in fp32 and rounded, is added. The positions are saved
(`save_precomputed_indices`, the default) or picked again from the base: the top `numel * (1 - sparsity)` of |W| in
the base dtype (`select_top`; bottom otherwise), with torch.topk, exactly as PEFT picks them when loading.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lora_cli.adapters.base import Adapter, AdapterKind, AdapterModule, EditContext, EditForm, Shape, TensorEdit
from lora_cli.adapters.from_base import original_from_base
from lora_cli.adapters.params import config_number, require


class SupertuningEdit(TensorEdit):
    kind = "supertuning"

    def __init__(self, adapter: Adapter, target: str, params: dict[str, str], lora_scale: float | None) -> None:
        super().__init__(adapter, target)
        self.values_key = params["supertuning_values"]
        self.indices_key = params.get("supertuning_indices")
        self.lora = (params["supertuning_lora_A.weight"], params["supertuning_lora_B.weight"]) if lora_scale else None
        self.lora_scale = lora_scale
        self.count = adapter.weights.shape(self.values_key)[0]
        self.select_top = bool(adapter.config.get("select_top", True))

    def adapter_keys(self) -> list[str]:
        return [k for k in (self.values_key, self.indices_key, *(self.lora or ())) if k]

    def check(self, shape: Shape) -> str | None:
        if len(shape) != 2 or self.count > shape[0] * shape[1]:
            return f"{self.target}: {self.count} Super-Tuning values vs base {tuple(shape)}"
        if self.indices_key and self.adapter.weights.shape(self.indices_key) != (self.count,):
            return f"{self.target}: Super-Tuning indices {self.adapter.weights.shape(self.indices_key)} vs values"
        if self.lora:
            a, b = (self.adapter.weights.shape(key) for key in self.lora)
            if (b[0], a[1]) != tuple(shape) or a[0] != b[1]:
                return f"{self.target}: Supra LoRA A {a}, B {b} vs base {tuple(shape)}"
        return None

    def _indices(self, weight: torch.Tensor, ctx: EditContext) -> torch.Tensor:
        if self.indices_key:
            return ctx.load(self.indices_key).to(torch.int64)
        scores = weight.to(ctx.stored_dtype or weight.dtype).abs().flatten()
        return torch.topk(scores, k=self.count, largest=self.select_top).indices.to(torch.int32).to(torch.int64)

    def _rounded(self, tensor: torch.Tensor, ctx: EditContext) -> torch.Tensor:
        """The tensor as PEFT has it after a `.to(base dtype)` (no-op on an fp32 base)."""
        return tensor if ctx.stored_dtype is None else tensor.to(ctx.stored_dtype).to(tensor.dtype)

    def _parts(self, weight: torch.Tensor, ctx: EditContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        values = ctx.load(self.values_key)
        if self.adapter.weight != 1.0:
            values = values * self.adapter.weight
        lora = None
        if self.lora:
            a, b = (ctx.load(key) for key in self.lora)
            lora = (
                (self.lora_scale * (b @ a))
                if self.adapter.weight == 1.0
                else self.lora_scale * (b @ a) * self.adapter.weight
            )
        return self._rounded(values, ctx), None if lora is None else self._rounded(lora, ctx)

    def apply(self, weight: torch.Tensor, ctx: EditContext) -> torch.Tensor:
        indices = self._indices(weight, ctx)
        values, lora = self._parts(weight, ctx)
        merged = weight.reshape(-1).scatter_add(0, indices, values.to(weight.dtype)).reshape(weight.shape)
        if lora is None:
            return merged
        return self._rounded(merged, ctx) + lora

    @property
    def form(self) -> EditForm:
        return EditForm("transform", revert_needs_base=self.indices_key is None)

    def revert(self, merged: torch.Tensor, ctx: EditContext, base: torch.Tensor | None = None) -> torch.Tensor:
        if self.indices_key is None:
            return original_from_base(
                self, merged, base, "the Super-Tuning positions were picked from the original weight"
            )
        values, lora = self._parts(merged, ctx)
        if lora is not None:
            merged = merged - lora
        indices = ctx.load(self.indices_key).to(torch.int64)
        return merged.reshape(-1).scatter_add(0, indices, -values).reshape(merged.shape)

    def describe(self) -> str:
        lora = f" + LoRA scale={self.lora_scale:g}" if self.lora else ""
        return f"supertuning {self.count} values{lora}"


class Supertuning(AdapterKind):
    peft_type = "SUPERTUNING"
    param_roots = frozenset({"supertuning_values", "supertuning_indices", "supertuning_lora_A", "supertuning_lora_B"})

    def module_edits(
        self, adapter: Adapter, module: AdapterModule, base_shape: Callable[[str], Shape | None]
    ) -> list[TensorEdit]:
        rank = adapter.config.get("r")
        scale = None
        if rank:
            rank = int(config_number(adapter, "r", 1))
            scale = config_number(adapter, "lora_alpha", 2 * rank) / rank
        require(adapter, module, "supertuning_values")
        if scale is not None:
            require(adapter, module, "supertuning_lora_A.weight", "supertuning_lora_B.weight")
        return [SupertuningEdit(adapter, f"{module.path}.weight", module.params, scale)]
