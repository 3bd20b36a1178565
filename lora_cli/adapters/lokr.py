"""LoKr as PEFT defines it (`peft/tuners/lokr/layer.py`): a Kronecker product of two (possibly factored) matrices.

w1 is `lokr_w1` or `lokr_w1_a @ lokr_w1_b` (`decompose_both`); w2 is `lokr_w2`, `lokr_w2_a @ lokr_w2_b`, or for
effective convolutions the CP form `einsum(lokr_t2, lokr_w2_a, lokr_w2_b)`. delta = kron(w1, w2) * alpha / r,
reshaped to the base weight, computed in PEFT's order in fp32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lora_cli.adapters.additive import AdditiveEdit
from lora_cli.adapters.base import Adapter, AdapterKind, AdapterModule, EditContext, Shape, TensorEdit
from lora_cli.adapters.loha import lycoris_scaling
from lora_cli.adapters.params import missing_params

PARAMS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


class LokrEdit(AdditiveEdit):
    kind = "lokr"

    def __init__(self, adapter: Adapter, target: str, params: dict[str, str], scaling: float, rank: int) -> None:
        super().__init__(
            adapter,
            target,
            [params[n] for n in PARAMS if n in params],
            f"r={rank} scale={scaling:g}",
            rank=rank,
            scale=scaling,
        )
        self.params = params
        self.scaling = scaling

    def _w1(self, ctx: EditContext) -> torch.Tensor:
        if "lokr_w1" in self.params:
            return ctx.load(self.params["lokr_w1"])
        return ctx.load(self.params["lokr_w1_a"]) @ ctx.load(self.params["lokr_w1_b"])

    def _w2(self, ctx: EditContext) -> torch.Tensor:
        if "lokr_w2" in self.params:
            return ctx.load(self.params["lokr_w2"])
        wa, wb = ctx.load(self.params["lokr_w2_a"]), ctx.load(self.params["lokr_w2_b"])
        if "lokr_t2" in self.params:
            return torch.einsum("i j k l, i p, j r -> p r k l", ctx.load(self.params["lokr_t2"]), wa, wb)
        return wa @ wb

    def expected_numel(self) -> int:
        shape = self.adapter.weights.shape

        def numel(full: str, a: str, b: str, core: str | None = None) -> int:
            if full in self.params:
                total = 1
                for dim in shape(self.params[full]):
                    total *= dim
                return total
            rows, cols = shape(self.params[a]), shape(self.params[b])
            if core and core in self.params:
                kernel = shape(self.params[core])[2:]
                return rows[1] * cols[1] * kernel[0] * kernel[1]
            return rows[0] * cols[1]

        return numel("lokr_w1", "lokr_w1_a", "lokr_w1_b") * numel("lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

    def peft_delta(self, shape: Shape, ctx: EditContext) -> torch.Tensor:
        w1, w2 = self._w1(ctx), self._w2(ctx)
        if w2.dim() == 4:  # PEFT's make_kron: a 2-D w1 gains two unit dims to pair with a conv kernel
            w1 = w1.unsqueeze(2).unsqueeze(2)
        return (torch.kron(w1, w2.contiguous()) * self.scaling).reshape(shape)


class Lokr(AdapterKind):
    peft_type = "LOKR"
    param_roots = frozenset(PARAMS)

    def module_edits(
        self, adapter: Adapter, module: AdapterModule, base_shape: Callable[[str], Shape | None]
    ) -> list[TensorEdit]:
        has = module.has
        w1 = has("lokr_w1") or (has("lokr_w1_a") and has("lokr_w1_b"))
        w2 = has("lokr_w2") or (has("lokr_w2_a") and has("lokr_w2_b"))
        if not (w1 and w2):
            raise missing_params(adapter, module.path, list(module.params), "both Kronecker factors")
        scaling, rank = lycoris_scaling(adapter, module.path)
        return [LokrEdit(adapter, f"{module.path}.weight", module.params, scaling, rank)]
