"""PEANuT as PEFT defines it (`peft/tuners/peanut/layer.py`): a small network applied to the base weight gives the
change, so the change is computed on the base tensor.

PEFT's `_compute_delta_weight` in fp32: h = act(W.T @ A.T); `depth` encoder layers h = act(E h) keeping each input
as a residual; as many decoder layers h = act(D h) + residual (last first); delta = (B h * scaling).T, rounded to
the base dtype before it is added.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from lora_cli.adapters.base import Adapter, AdapterKind, AdapterModule, EditContext, Shape, TensorEdit
from lora_cli.adapters.from_base import FromBaseEdit
from lora_cli.adapters.params import config_number, require
from lora_cli.errors import InputError


class PeanutEdit(FromBaseEdit):
    kind = "peanut"
    rounds_change = True

    def __init__(self, adapter: Adapter, target: str, params: dict[str, str], depth: int, scaling: float) -> None:
        self.a_key, self.b_key = params["peanut_A.weight"], params["peanut_B.weight"]
        self.encoders = [params[f"peanut_encoders.{i}.weight"] for i in range(depth)]
        self.decoders = [params[f"peanut_decoders.{i}.weight"] for i in range(depth)]
        self.scaling = scaling
        self.act_fn = str(adapter.config.get("act_fn", "relu"))
        rank = adapter.weights.shape(self.a_key)[0]
        detail = f"r={rank} depth={depth} act={self.act_fn} scale={scaling:g}"
        super().__init__(adapter, target, [self.a_key, self.b_key, *self.encoders, *self.decoders], detail)

    def check(self, shape: Shape) -> str | None:
        a, b = self.adapter.weights.shape(self.a_key), self.adapter.weights.shape(self.b_key)
        if len(shape) != 2 or a[1] != shape[0] or b != (shape[0], a[0]):
            return f"{self.target}: PEANuT A {a}, B {b} vs base {tuple(shape)}"
        return None

    def change(self, weight: torch.Tensor, ctx: EditContext) -> torch.Tensor:
        from transformers.activations import ACT2FN

        non_linear = ACT2FN[self.act_fn]
        a = ctx.load(self.a_key)
        delta_w = non_linear(torch.matmul(weight.transpose(0, 1).to(a.dtype), a.t()))
        residuals = []
        for key in self.encoders:
            residuals.append(delta_w)
            delta_w = non_linear(F.linear(delta_w, ctx.load(key)))
        for i, key in enumerate(self.decoders):
            delta_w = non_linear(F.linear(delta_w, ctx.load(key)))
            delta_w = delta_w + residuals[len(self.decoders) - 1 - i]
        delta_w = F.linear(delta_w, ctx.load(self.b_key))
        return (delta_w * self.scaling).transpose(0, 1)


class Peanut(AdapterKind):
    peft_type = "PEANUT"
    param_roots = frozenset({"peanut_A", "peanut_B", "peanut_encoders", "peanut_decoders"})

    def check_adapter(self, adapter: Adapter) -> None:
        from transformers.activations import ACT2FN

        if str(adapter.config.get("act_fn", "relu")) not in ACT2FN:
            raise InputError(
                f"act_fn {adapter.config.get('act_fn')!r} is not an activation transformers knows",
                path=adapter.config_path,
            )

    def module_edits(
        self, adapter: Adapter, module: AdapterModule, base_shape: Callable[[str], Shape | None]
    ) -> list[TensorEdit]:
        depth = int(config_number(adapter, "depth", 0))
        scaling = config_number(adapter, "scaling", 1.0)
        names = ["peanut_A.weight", "peanut_B.weight"]
        names += [f"peanut_{part}.{i}.weight" for part in ("encoders", "decoders") for i in range(depth)]
        require(adapter, module, *names)
        return [PeanutEdit(adapter, f"{module.path}.weight", module.params, depth, scaling)]
