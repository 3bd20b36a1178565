"""The edit most adapter types reduce to: W + w * delta, with delta computed in PEFT's order in working precision.

Each type supplies `delta`; the user's `ADAPTER@w` multiplier, the shape check and the exact undo live here once.
"""

from __future__ import annotations

import math
from abc import abstractmethod

import torch

from lora_cli.adapters.base import Adapter, AdapterModule, EditContext, Shape, TensorEdit
from lora_cli.errors import InputError, UnsupportedAdapterError


class AdditiveEdit(TensorEdit):
    """W + w * delta(W's shape); undone by subtracting the same delta."""

    def __init__(self, adapter: Adapter, target: str, keys: list[str], detail: str = "") -> None:
        super().__init__(adapter, target)
        self.keys = keys
        self.detail = detail

    def adapter_keys(self) -> list[str]:
        return list(self.keys)

    def expected_numel(self) -> int | None:
        """How many elements the delta has, when the factors alone tell (None: `check_shape` decides)."""
        return None

    def check(self, shape: Shape) -> str | None:
        numel = self.expected_numel()
        if numel is not None and numel != math.prod(shape):
            return f"{self.target}: {self.kind} delta has {numel} elements vs base {tuple(shape)}"
        return None

    @abstractmethod
    def delta(self, shape: Shape, ctx: EditContext) -> torch.Tensor:
        """The module's delta for a base tensor of `shape`, in PEFT's order of operations."""

    def scaled_delta(self, shape: Shape, ctx: EditContext) -> torch.Tensor:
        delta = self.delta(shape, ctx)
        return delta if self.adapter.weight == 1.0 else delta * self.adapter.weight

    def additive_delta(self, shape: Shape, ctx: EditContext) -> torch.Tensor | None:
        return self.scaled_delta(shape, ctx)

    def apply(self, weight: torch.Tensor, ctx: EditContext) -> torch.Tensor:
        return weight.add_(self.scaled_delta(tuple(weight.shape), ctx))

    def revert(self, merged: torch.Tensor, ctx: EditContext, base: torch.Tensor | None = None) -> torch.Tensor:
        return merged - self.scaled_delta(tuple(merged.shape), ctx)

    def describe(self) -> str:
        return f"{self.kind} {self.detail}".strip()


def config_number(
    adapter: Adapter, key: str, default: float, *, pattern: str | None = None, module_path: str = ""
) -> float:
    """A numeric config value, with its per-module override from `pattern` (e.g. `alpha_pattern`), validated."""
    value = adapter.config.get(key, default)
    if value is None:
        value = default
    if pattern is not None:
        value = adapter.pattern_value(pattern, module_path, value)
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise InputError(f"{key} must be a number, got {value!r}", path=adapter.directory / "adapter_config.json")
    return value


def refuse_weight(adapter: Adapter, name: str, why: str) -> None:
    """`ADAPTER@WEIGHT` scales a delta; types that rotate or multiply the base have none to scale."""
    if adapter.weight != 1.0:
        raise UnsupportedAdapterError(
            f"{why}, so ADAPTER@WEIGHT is not defined for it",
            path=adapter.ref,
            fix=f"pass the {name} adapter without @WEIGHT",
        )


def require(adapter: Adapter, module: AdapterModule, *names: str) -> list[str]:
    """The adapter keys of `names` in this module, in that order; one clear error when any is missing."""
    if not all(module.has(name) for name in names):
        raise missing_params(adapter, module.path, list(module.params), " and ".join(names))
    return [module.params[name] for name in names]


def missing_params(adapter: Adapter, module_path: str, have: list[str], need: str) -> InputError:
    return InputError(
        f"{module_path} has {sorted(have)} but not {need}",
        path=adapter.weights.path,
        fix="the adapter file is incomplete; re-save it",
    )
