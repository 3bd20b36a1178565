"""DEFT (and PaRa) as PEFT defines it (`peft/tuners/deft/layer.py`): a rank-r subspace of the weight's output space is
removed and, for DEFT, a learned injection put in its place.

PEFT's `get_delta_weight` in fp32: (Q, right) = (P, relu(P)) or (qr(P), qr(P)); factor = right.T @ W;
delta = Q @ (R * scaling - factor), or -Q @ factor for PaRa (`para`), with W and delta in the layer's logical
(out, in) layout (`fan_in_fan_out` transposes), rounded to the base dtype before it is added.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lora_cli.adapters.base import Adapter, AdapterKind, AdapterModule, EditContext, Shape, TensorEdit
from lora_cli.adapters.from_base import FromBaseEdit
from lora_cli.adapters.params import config_number, require
from lora_cli.errors import InputError

METHODS = ("relu", "qr")


class DeftEdit(FromBaseEdit):
    kind = "deft"
    rounds_change = True

    def __init__(self, adapter: Adapter, target: str, p_key: str, r_key: str | None, scaling: float) -> None:
        self.p_key, self.r_key, self.scaling = p_key, r_key, scaling
        self.method = str(adapter.config.get("decomposition_method", "relu"))
        self.fan_in_fan_out = bool(adapter.config.get("fan_in_fan_out"))
        rank = adapter.weights.shape(p_key)[1]
        name = "para" if r_key is None else "deft"
        detail = f"{name} r={rank} {self.method} scale={scaling:g}"
        super().__init__(adapter, target, [p_key] if r_key is None else [p_key, r_key], detail)

    def _logical(self, shape: Shape) -> tuple[int, int]:
        return (shape[1], shape[0]) if self.fan_in_fan_out else (shape[0], shape[1])

    def check(self, shape: Shape) -> str | None:
        p = self.adapter.weights.shape(self.p_key)
        if len(shape) != 2:
            return f"{self.target}: DEFT adapts linear layers only, base is {tuple(shape)}"
        out, into = self._logical(shape)
        r = self.adapter.weights.shape(self.r_key) if self.r_key else (p[1], into)
        if p[0] != out or r != (p[1], into):
            return f"{self.target}: DEFT P {p}, R {r} vs base {tuple(shape)}"
        return None

    def change(self, weight: torch.Tensor, ctx: EditContext) -> torch.Tensor:
        p = ctx.load(self.p_key).to(torch.float32)
        if self.method == "relu":
            q, right = p, torch.relu(p)
        else:
            q, _ = torch.linalg.qr(p)
            right = q
        w = weight.to(torch.float32)
        factor = right.transpose(0, 1) @ (w.T if self.fan_in_fan_out else w)
        if self.r_key is None:
            delta = -(q @ factor)
        else:
            delta = q @ (ctx.load(self.r_key).to(torch.float32) * self.scaling - factor)
        return delta.T if self.fan_in_fan_out else delta


class Deft(AdapterKind):
    peft_type = "DEFT"
    param_roots = frozenset({"deft_P", "deft_R"})

    def check_adapter(self, adapter: Adapter) -> None:
        method = adapter.config.get("decomposition_method", "relu")
        if method not in METHODS:
            raise InputError(
                f"decomposition_method {method!r} is not one of {', '.join(METHODS)}",
                path=adapter.config_path,
            )

    def module_edits(
        self, adapter: Adapter, module: AdapterModule, base_shape: Callable[[str], Shape | None]
    ) -> list[TensorEdit]:
        para = bool(adapter.config.get("para"))
        alpha = adapter.config.get("alpha")
        (p_key,) = require(adapter, module, "deft_P")
        r_key = None if para else require(adapter, module, "deft_R")[0]
        rank = adapter.weights.shape(p_key)[1]
        # PEFT: alpha / r with r capped at out_features (P's columns), or no scaling when alpha is unset.
        scaling = config_number(adapter, "alpha", 0) / rank if alpha else 1.0
        return [DeftEdit(adapter, f"{module.path}.weight", p_key, r_key, scaling)]
