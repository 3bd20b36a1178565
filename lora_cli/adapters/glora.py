"""GLoRA as PEFT defines it (`peft/tuners/glora/layer.py`): W' = W + W * A + B and b' = b + b * D + E + W @ C, each
of A..E a LoRA pair (Xd @ Xu), a vector, a scalar or nothing, as `config_A_B`, `config_C`, `config_D_E` chose.

PEFT's `merge` computes in the base dtype: each path's value is rounded to it, then W * A + B and W + (...) are
rounded as bf16 arithmetic rounds; loractl replays those roundings from the stored dtype, so the bytes match.
The bias path W @ C reads the layer's weight while the bias is written, which a tensor-at-a-time merge cannot do:
an adapter with a C path on a layer with a bias is refused by name. The undo divides as PEFT's `unmerge` does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lora_cli.adapters.base import Adapter, AdapterKind, AdapterModule, EditContext, Shape, TensorEdit
from lora_cli.adapters.params import missing_params, refuse_weight
from lora_cli.errors import UnsupportedAdapterError

PATHS = ("A", "B", "C", "D", "E")


def path_keys(module: AdapterModule, name: str) -> dict[str, str]:
    """A path's tensors by leaf ("Xd", "Xu", "X", "zeros"); empty when the path is absent."""
    prefix = f"glora_{name}."
    return {param[len(prefix) :]: key for param, key in module.params.items() if param.startswith(prefix)}


def path_value(keys: dict[str, str], ctx: EditContext) -> torch.Tensor | None:
    """PEFT's `GloraPath.forward` in fp32; None for an empty path (its zeros)."""
    if "Xd" in keys and "Xu" in keys:
        return ctx.load(keys["Xd"]) @ ctx.load(keys["Xu"])
    if "X" in keys:
        x = ctx.load(keys["X"])
        return x[0] if x.shape == (1,) else x
    return None


def rounded(tensor: torch.Tensor, ctx: EditContext) -> torch.Tensor:
    """The tensor as the base dtype holds it (PEFT's `.to(dtype)` and its arithmetic in that dtype)."""
    return tensor if ctx.stored_dtype is None else tensor.to(ctx.stored_dtype).to(tensor.dtype)


class GloraEdit(TensorEdit):
    """W + (W * A + B) on the weight, or b + (b * D + E) on the bias."""

    kind = "glora"

    def __init__(self, adapter: Adapter, target: str, scale_keys: dict[str, str], shift_keys: dict[str, str]) -> None:
        super().__init__(adapter, target)
        self.scale_keys, self.shift_keys = scale_keys, shift_keys

    def adapter_keys(self) -> list[str]:
        return [*self.scale_keys.values(), *self.shift_keys.values()]

    def _paths(self, ctx: EditContext, shape: Shape) -> tuple[torch.Tensor, torch.Tensor]:
        zeros = torch.zeros((), device=ctx.device)
        scale, shift = path_value(self.scale_keys, ctx), path_value(self.shift_keys, ctx)
        scale = zeros if scale is None else rounded(scale, ctx)
        shift = zeros if shift is None else rounded(shift, ctx)
        return scale, shift

    def apply(self, weight: torch.Tensor, ctx: EditContext) -> torch.Tensor:
        scale, shift = self._paths(ctx, tuple(weight.shape))
        change = rounded(rounded(weight * scale, ctx) + shift, ctx)
        return weight + change

    def revert(self, merged: torch.Tensor, ctx: EditContext, base: torch.Tensor | None = None) -> torch.Tensor:
        scale, shift = self._paths(ctx, tuple(merged.shape))
        return (merged - shift) / (1.0 + scale)

    def check(self, shape: Shape) -> str | None:
        for keys in (self.scale_keys, self.shift_keys):
            if "Xd" in keys and "Xu" in keys:
                d, u = self.adapter.weights.shape(keys["Xd"]), self.adapter.weights.shape(keys["Xu"])
                if (d[0], u[1]) != tuple(shape):
                    return f"{self.target}: GLoRA path {d} @ {u} vs base {tuple(shape)}"
            elif "X" in keys:
                x = self.adapter.weights.shape(keys["X"])
                if x != (1,) and x[0] != shape[0]:
                    return f"{self.target}: GLoRA vector {x} vs base {tuple(shape)}"
        return None

    def describe(self) -> str:
        return f"glora {self.target.rsplit('.', 1)[-1]}"


class Glora(AdapterKind):
    peft_type = "GLORA"
    param_roots = frozenset(f"glora_{name}" for name in PATHS)
    param_leaves = frozenset({"Xd", "Xu", "X", "zeros"})

    def check_adapter(self, adapter: Adapter) -> None:
        refuse_weight(adapter, "GLoRA", "GLoRA scales the base weight by its A path, which has no delta to scale")

    def module_edits(
        self, adapter: Adapter, module: AdapterModule, base_shape: Callable[[str], Shape | None]
    ) -> list[TensorEdit]:
        paths = {name: path_keys(module, name) for name in PATHS}
        if not paths["A"] and not paths["B"]:
            raise missing_params(adapter, module.path, list(module.params), "glora_A and glora_B")
        edits: list[TensorEdit] = [GloraEdit(adapter, f"{module.path}.weight", paths["A"], paths["B"])]
        bias = f"{module.path}.bias"
        if base_shape(bias) is None:
            return edits
        if path_value_is_set(paths["C"]):
            raise UnsupportedAdapterError(
                f"{module.path}: GLoRA's bias update adds W @ C, which reads the layer's weight while its bias is "
                "written; loractl merges one tensor at a time",
                path=adapter.weights.path,
                fix="merge this adapter with PEFT's merge_and_unload, or train it with config_C='none'",
            )
        if path_value_is_set(paths["D"]) or path_value_is_set(paths["E"]):
            edits.append(GloraEdit(adapter, bias, paths["D"], paths["E"]))
        return edits


def path_value_is_set(keys: dict[str, str]) -> bool:
    return ("Xd" in keys and "Xu" in keys) or "X" in keys
