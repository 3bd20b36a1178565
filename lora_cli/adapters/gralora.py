"""GraLoRA as PEFT defines it (`peft/tuners/gralora/layer.py`): a k x k grid of small LoRA blocks, each input block
of A paired with every output block of B, plus an optional plain LoRA (`hybrid_r`).

PEFT's `get_delta_weight`, step for step in fp32: A [k, in/k, r] is scattered to [in, k, r], its rank split into
k sub-ranks and permuted, contracted with B [k, r, out/k] by einsum to [in, out] and transposed; the hybrid part
B_general @ A_general is added; then transpose(fan_in_fan_out) * alpha / (r + hybrid_r).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lora_cli.adapters.additive import AdditiveEdit
from lora_cli.adapters.base import Adapter, AdapterKind, AdapterModule, EditContext, Shape, TensorEdit
from lora_cli.adapters.params import config_number, require


class GraloraEdit(AdditiveEdit):
    kind = "gralora"

    def __init__(self, adapter: Adapter, target: str, params: dict[str, str], alpha: float) -> None:
        self.a_key, self.b_key = params["gralora_A"], params["gralora_B"]
        self.hybrid = (
            (params["gralora_A_general.weight"], params["gralora_B_general.weight"])
            if ("gralora_A_general.weight" in params and "gralora_B_general.weight" in params)
            else None
        )
        self.k, self.in_block, self.gralora_r = adapter.weights.shape(self.a_key)
        self.out_block = adapter.weights.shape(self.b_key)[2]
        self.hybrid_r = adapter.weights.shape(self.hybrid[0])[0] if self.hybrid else 0
        self.scaling = alpha / (self.gralora_r + self.hybrid_r)
        self.fan_in_fan_out = bool(adapter.config.get("fan_in_fan_out"))
        keys = [self.a_key, self.b_key, *(self.hybrid or ())]
        detail = f"k={self.k} r={self.gralora_r} hybrid_r={self.hybrid_r} scale={self.scaling:g}"
        super().__init__(adapter, target, keys, detail, scale=self.scaling)

    def expected_shape(self) -> Shape:
        out, into = self.k * self.out_block, self.k * self.in_block
        return (into, out) if self.fan_in_fan_out else (out, into)

    def check(self, shape: Shape) -> str | None:
        b = self.adapter.weights.shape(self.b_key)
        out, into = self.k * self.out_block, self.k * self.in_block
        expected = (into, out) if self.fan_in_fan_out else (out, into)
        if tuple(shape) != expected or b[:2] != (self.k, self.gralora_r) or self.gralora_r % self.k:
            return f"{self.target}: GraLoRA A {self.adapter.weights.shape(self.a_key)}, B {b} vs base {tuple(shape)}"
        return None

    def peft_delta(self, shape: Shape, ctx: EditContext) -> torch.Tensor:
        a, b = ctx.load(self.a_key), ctx.load(self.b_key)
        k, rank = self.k, self.gralora_r
        in_features, out_features = k * self.in_block, k * self.out_block
        sub_rank = rank // k
        features = torch.arange(in_features, device=ctx.device)
        blocks = features // (in_features // k)
        within = features % (in_features // k)
        scattered = torch.zeros(in_features, k, rank, device=ctx.device, dtype=a.dtype)
        scattered.scatter_(1, blocks.unsqueeze(1).unsqueeze(2).expand(-1, 1, rank), a[blocks, within, :].unsqueeze(1))
        permuted = scattered.view(in_features, k, k, sub_rank).permute(0, 2, 1, 3).reshape(in_features, k, rank)
        delta = torch.einsum("ikr, kro -> iko", permuted, b).reshape(in_features, out_features).T
        if self.hybrid:
            delta += ctx.load(self.hybrid[1]) @ ctx.load(self.hybrid[0])
        return (delta.T if self.fan_in_fan_out else delta) * self.scaling


class Gralora(AdapterKind):
    peft_type = "GRALORA"
    param_roots = frozenset({"gralora_A", "gralora_B", "gralora_A_general", "gralora_B_general"})

    def module_edits(
        self, adapter: Adapter, module: AdapterModule, base_shape: Callable[[str], Shape | None]
    ) -> list[TensorEdit]:
        alpha = config_number(adapter, "alpha", 64)
        require(adapter, module, "gralora_A", "gralora_B")
        return [GraloraEdit(adapter, f"{module.path}.weight", module.params, alpha)]
