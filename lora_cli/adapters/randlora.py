"""RandLoRA as PEFT defines it (`peft/tuners/randlora/layer.py`): full-rank updates from frozen random bases
shared by every module, scaled per module by learned `lambda` and `gamma`.

PEFT's `get_scaled_bases` slices the bases to the layer, scales the smaller one by lambda and gamma, and orders the
pair by which side is smaller; delta = transpose((B^T @ A^T)^T, fan_in_fan_out) * alpha / r, all in fp32. The bases
are read from the module's own copy or, failing that, the one saved once for the model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lora_cli.adapters.additive import AdditiveEdit
from lora_cli.adapters.base import Adapter, AdapterKind, AdapterModule, EditContext, Shape, TensorEdit
from lora_cli.adapters.params import config_number, missing_params
from lora_cli.errors import UnsupportedAdapterError


class RandloraEdit(AdditiveEdit):
    kind = "randlora"

    def __init__(self, adapter: Adapter, target: str, params: dict[str, str], scaling: float) -> None:
        self.params = params
        self.scaling = scaling
        self.fan_in_fan_out = bool(adapter.config.get("fan_in_fan_out"))
        rank, bases = adapter.weights.shape(params["randlora_lambda"])
        keys = [params[name] for name in ("randlora_A", "randlora_B", "randlora_lambda", "randlora_gamma")]
        super().__init__(adapter, target, keys, f"r={rank} bases={bases} scale={scaling:g}", scale=scaling)

    def check(self, shape: Shape) -> str | None:
        if len(shape) != 2:
            return f"{self.target}: RandLoRA adapts linear layers only, base is {tuple(shape)}"
        out, into = (shape[1], shape[0]) if self.fan_in_fan_out else shape
        gamma = self.adapter.weights.shape(self.params["randlora_gamma"])
        if gamma[1] != min(out, into):
            return f"{self.target}: RandLoRA gamma {gamma} vs base {tuple(shape)}"
        return None

    def peft_delta(self, shape: Shape, ctx: EditContext) -> torch.Tensor:
        out, into = (shape[1], shape[0]) if self.fan_in_fan_out else shape
        lam, gamma = ctx.load(self.params["randlora_lambda"]), ctx.load(self.params["randlora_gamma"])
        bases = lam.shape[1]
        min_dim, max_dim = min(out, into), max(out, into)
        sliced_a = ctx.load(self.params["randlora_A"])[:, :bases, :min_dim]
        sliced_b = ctx.load(self.params["randlora_B"])[:max_dim, :bases, :]
        update_b = sliced_b.flatten(start_dim=1)
        update_a = (lam[:, :, None] * sliced_a * gamma[None,]).flatten(end_dim=1)
        # PEFT returns (A, B) when the input side is the smaller one, else (B^T, A^T), and names them the other way.
        first, second = (update_a, update_b) if min_dim == into else (update_b.T, update_a.T)
        update = (first.T @ second.T).T
        return (update.T if self.fan_in_fan_out else update) * self.scaling


class Randlora(AdapterKind):
    peft_type = "RANDLORA"
    param_roots = frozenset({"randlora_A", "randlora_B", "randlora_lambda", "randlora_gamma"})

    def module_edits(
        self, adapter: Adapter, module: AdapterModule, base_shape: Callable[[str], Shape | None]
    ) -> list[TensorEdit]:
        params = {**self.shared_params(adapter), **module.params}
        if not ("randlora_lambda" in params and "randlora_gamma" in params):
            raise missing_params(adapter, module.path, list(module.params), "randlora_lambda and randlora_gamma")
        if not ("randlora_A" in params and "randlora_B" in params):
            raise UnsupportedAdapterError(
                "this RandLoRA adapter was saved without its random bases (save_projection=False)",
                path=adapter.weights.path,
                fix="re-save it with save_projection=True (the default)",
            )
        alpha = config_number(adapter, "randlora_alpha", 640)
        rank = adapter.weights.shape(params["randlora_lambda"])[0]
        return [RandloraEdit(adapter, f"{module.path}.weight", params, alpha / rank)]
