"""Edits whose change is computed from the base weight itself (DEFT, PEANuT, OSF, PSOFT, FRoD, ...).

PEFT forms these deltas from the layer's own weight (an SVD of it, a projection of it, a network applied to it), so
they cannot be formed from the adapter alone: `apply` computes the change from the tensor it is given, in PEFT's
order, and adds it (scaled by `ADAPTER@w`). The change cannot be recomputed from the merged tensor, so the undo
takes the original from the base (`unmerge --base`), as PEFT's own unmerge restores a copy it kept.
"""

from __future__ import annotations

from abc import abstractmethod

import torch

from lora_cli.adapters.base import Adapter, EditContext, EditForm, TensorEdit
from lora_cli.errors import NotRevertibleError


class FromBaseEdit(TensorEdit):
    """W + w * change(W)."""

    # PEFT rounds the change to the base dtype before adding it (`delta.to(weight.dtype)`): so does the edit.
    rounds_change: bool = False

    def __init__(self, adapter: Adapter, target: str, keys: list[str], detail: str = "") -> None:
        super().__init__(adapter, target)
        self.keys = keys
        self.detail = detail

    def adapter_keys(self) -> list[str]:
        return list(self.keys)

    @abstractmethod
    def change(self, weight: torch.Tensor, ctx: EditContext) -> torch.Tensor:
        """The delta PEFT adds to this base weight (working precision, the weight's layout)."""

    def apply(self, weight: torch.Tensor, ctx: EditContext) -> torch.Tensor:
        delta = self.change(weight, ctx)
        if self.adapter.weight != 1.0:
            delta = delta * self.adapter.weight
        if self.rounds_change and ctx.stored_dtype is not None:
            delta = delta.to(ctx.stored_dtype).to(weight.dtype)
        return weight + delta

    @property
    def form(self) -> EditForm:
        return EditForm("transform", revert_needs_base=True)

    def revert(self, merged: torch.Tensor, ctx: EditContext, base: torch.Tensor | None = None) -> torch.Tensor:
        return original_from_base(self, merged, base, f"the {self.kind} change was computed from the original weight")

    def describe(self) -> str:
        return f"{self.kind} {self.detail}".strip()


def original_from_base(edit: TensorEdit, merged: torch.Tensor, base: torch.Tensor | None, why: str) -> torch.Tensor:
    """The original weight, for a change that was computed from it: taken from --base, or refused saying so."""
    if base is None:
        raise NotRevertibleError(
            f"{edit.target}: {why}, which the merged checkpoint no longer holds",
            path=edit.adapter.ref,
            fix="pass --base BASE to take the original from the base model",
        )
    return base.to(merged.dtype)
