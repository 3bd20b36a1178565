"""AdaLoRA as PEFT defines it (`peft/tuners/adalora/layer.py`): an SVD-shaped LoRA, P diag(E) Q.

delta = transpose(B @ (A * E), fan_in_fan_out) * scaling / (ranknum + 1e-5), where scaling is lora_alpha (or the
rank when alpha is 0) and ranknum is `init_r` in fp32: PEFT does not save it, and keeps the initial rank when it
prunes by `rank_pattern`. Convolutions reshape the same product to the kernel.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lora_cli.adapters.additive import AdditiveEdit
from lora_cli.adapters.base import Adapter, AdapterKind, AdapterModule, EditContext, Shape, TensorEdit
from lora_cli.adapters.params import config_number, require

PARAMS = ("lora_A", "lora_B", "lora_E")


class AdaloraEdit(AdditiveEdit):
    kind = "adalora"

    def __init__(self, adapter: Adapter, target: str, params: dict[str, str], scaling: float, ranknum: float) -> None:
        keys = [params[name] for name in (*PARAMS, "ranknum") if name in params]
        rank = adapter.weights.shape(params["lora_A"])[0]
        super().__init__(adapter, target, keys, f"r={rank} scale={scaling:g} ranknum={ranknum:g}", scale=scaling)
        self.params = params
        self.scaling = scaling
        self.ranknum = ranknum
        self.fan_in_fan_out = bool(adapter.config.get("fan_in_fan_out"))

    def expected_numel(self) -> int:
        a, b = self.adapter.weights.shape(self.params["lora_A"]), self.adapter.weights.shape(self.params["lora_B"])
        return b[0] * a[1]

    def peft_delta(self, shape: Shape, ctx: EditContext) -> torch.Tensor:
        a, b, e = (ctx.load(self.params[name]) for name in PARAMS)
        if "ranknum" in self.params:  # older files saved it
            ranknum = ctx.load(self.params["ranknum"])
        else:
            ranknum = torch.tensor([self.ranknum], dtype=a.dtype, device=a.device)
        product = b @ (a * e)
        if self.fan_in_fan_out and len(shape) == 2:
            product = product.T
        return (product * self.scaling / (ranknum + 1e-5)).reshape(shape)


class Adalora(AdapterKind):
    peft_type = "ADALORA"
    param_roots = frozenset({*PARAMS, "ranknum"})

    def module_edits(
        self, adapter: Adapter, module: AdapterModule, base_shape: Callable[[str], Shape | None]
    ) -> list[TensorEdit]:
        require(adapter, module, *PARAMS)
        init_r = config_number(adapter, "init_r", 12)
        alpha = config_number(adapter, "lora_alpha", 8)
        rank = adapter.weights.shape(module.params["lora_A"])[0]
        scaling = alpha if alpha > 0 else float(rank)
        return [AdaloraEdit(adapter, f"{module.path}.weight", module.params, scaling, float(init_r))]
