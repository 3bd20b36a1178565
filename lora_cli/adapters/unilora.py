"""UniLoRA as PEFT defines it (`peft/tuners/unilora/layer.py`): every entry of every layer's LoRA factors is one of a
single shared vector theta_d, picked by an index and scaled by 1/sqrt(how often that entry is used).

delta = transpose(B @ A, fan_in_fan_out), A = theta_d[indices_A] * scales_A and B = theta_d[indices_B] * scales_B,
in fp32. The indices and scales are saved with `save_indices=True`. Without them PEFT deals one shuffled index
array out over the layers in the model's module order, which the checkpoint does not record: loractl refuses that
case by name rather than guess the order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lora_cli.adapters.additive import AdditiveEdit
from lora_cli.adapters.base import Adapter, AdapterKind, AdapterModule, EditContext, Shape, TensorEdit
from lora_cli.adapters.params import missing_params, require
from lora_cli.errors import UnsupportedAdapterError

PARAMS = ("unilora_indices_A", "unilora_indices_B", "unilora_scales_A", "unilora_scales_B")


class UniloraEdit(AdditiveEdit):
    kind = "unilora"

    def __init__(self, adapter: Adapter, target: str, keys: list[str], theta: str) -> None:
        self.indices_a, self.indices_b, self.scales_a, self.scales_b = keys
        self.theta = theta
        self.fan_in_fan_out = bool(adapter.config.get("fan_in_fan_out"))
        rank = adapter.weights.shape(self.indices_a)[0]
        super().__init__(adapter, target, [*keys, theta], f"r={rank}", rank=rank)

    def expected_shape(self) -> Shape:
        out, into = self.adapter.weights.shape(self.indices_b)[0], self.adapter.weights.shape(self.indices_a)[1]
        return (into, out) if self.fan_in_fan_out else (out, into)

    def check(self, shape: Shape) -> str | None:
        weights = self.adapter.weights
        if weights.shape(self.scales_a) != weights.shape(self.indices_a) or weights.shape(
            self.scales_b
        ) != weights.shape(self.indices_b):
            return f"{self.target}: UniLoRA scales and indices differ in shape"
        if tuple(shape) != self.expected_shape():
            return f"{self.target}: UniLoRA delta {self.expected_shape()} vs base {tuple(shape)}"
        return None

    def peft_delta(self, shape: Shape, ctx: EditContext) -> torch.Tensor:
        theta = ctx.load(self.theta)
        a = theta[ctx.load(self.indices_a).long()] * ctx.load(self.scales_a)
        b = theta[ctx.load(self.indices_b).long()] * ctx.load(self.scales_b)
        delta = b @ a
        return delta.T if self.fan_in_fan_out else delta


class Unilora(AdapterKind):
    peft_type = "UNILORA"
    param_roots = frozenset({"unilora_theta_d", *PARAMS})

    def check_adapter(self, adapter: Adapter) -> None:
        if "unilora_theta_d" not in self.shared_params(adapter):
            raise missing_params(adapter, "base_model", list(self.shared_params(adapter)), "unilora_theta_d")
        if not any(module.has("unilora_indices_A") for module in adapter.modules.values()):
            raise UnsupportedAdapterError(
                "this UniLoRA adapter was saved without its indices (save_indices=False): PEFT deals them out again "
                "over the layers in the model's module order, which the checkpoint does not record",
                path=adapter.weights.path,
                fix="re-save it with save_indices=True, or merge it with PEFT",
            )

    def module_edits(
        self, adapter: Adapter, module: AdapterModule, base_shape: Callable[[str], Shape | None]
    ) -> list[TensorEdit]:
        keys = require(adapter, module, *PARAMS)
        return [UniloraEdit(adapter, f"{module.path}.weight", keys, self.shared_params(adapter)["unilora_theta_d"])]
