"""The edit most adapter types reduce to: W + w * delta, with delta computed in PEFT's order in working precision.

Each type supplies `peft_delta` (PEFT's `get_delta_weight`); the user's `ADAPTER@w` multiplier, the shape check,
the form and the exact undo live here once.
"""

from __future__ import annotations

import math
from abc import abstractmethod

import torch

from lora_cli.adapters.base import Adapter, EditContext, EditForm, LowRank, Shape, TensorEdit


class AdditiveEdit(TensorEdit):
    """W + w * delta(W's shape); undone by subtracting the same delta."""

    def __init__(
        self,
        adapter: Adapter,
        target: str,
        keys: list[str],
        detail: str = "",
        *,
        rank: int | None = None,
        scale: float | None = None,
    ) -> None:
        super().__init__(adapter, target)
        self.keys = keys
        self.detail = detail
        self.rank = rank
        self.scale = scale  # the type's own scaling (alpha / r and the like), before ADAPTER@w

    def adapter_keys(self) -> list[str]:
        return list(self.keys)

    def expected_shape(self) -> Shape | None:
        """The delta's shape, when the adapter tensors alone tell."""
        return None

    def expected_numel(self) -> int | None:
        """How many elements the delta has, when the factors alone tell (None: `check` decides)."""
        shape = self.expected_shape()
        return math.prod(shape) if shape is not None else None

    def low_rank(self) -> LowRank | None:
        """The factors, where the delta is a product of two adapter tensors."""
        return None

    def row_blocks(self) -> bool:
        """Whether `row_delta` gives the delta's rows with the whole delta's bytes (see `EditForm.row_blocks`)."""
        return False

    @property
    def form(self) -> EditForm:
        return EditForm(
            "additive",
            shape=self.expected_shape(),
            numel=self.expected_numel(),
            rank=self.rank,
            scale=None if self.scale is None else self.scale * self.adapter.weight,
            low_rank=self.low_rank(),
            row_blocks=self.row_blocks(),
        )

    def check(self, shape: Shape) -> str | None:
        numel = self.expected_numel()
        if numel is not None and numel != math.prod(shape):
            return f"{self.target}: {self.kind} delta has {numel} elements vs base {tuple(shape)}"
        return None

    @abstractmethod
    def peft_delta(self, shape: Shape, ctx: EditContext) -> torch.Tensor:
        """The module's delta for a base tensor of `shape`, in PEFT's order of operations (its `get_delta_weight`)."""

    def delta(self, shape: Shape, ctx: EditContext) -> torch.Tensor:
        delta = self.peft_delta(shape, ctx)
        return delta if self.adapter.weight == 1.0 else delta * self.adapter.weight

    def apply(self, weight: torch.Tensor, ctx: EditContext) -> torch.Tensor:
        return weight.add_(self.delta(tuple(weight.shape), ctx))

    def revert(self, merged: torch.Tensor, ctx: EditContext, base: torch.Tensor | None = None) -> torch.Tensor:
        return merged.sub_(self.delta(tuple(merged.shape), ctx))

    def describe(self) -> str:
        return f"{self.kind} {self.detail}".strip()
