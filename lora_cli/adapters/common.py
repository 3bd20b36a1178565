"""Edits every adapter type can carry besides its own factors: full module copies and replaced token rows."""

from __future__ import annotations

import torch

from lora_cli.adapters.base import Adapter, EditContext, EditForm, Shape, TensorEdit
from lora_cli.errors import InputError, NotRevertibleError


class FullTensorEdit(TensorEdit):
    """The adapter's full copy replaces the base tensor: `modules_to_save`, or a targeted embedding's `base_layer`.

    A `base_layer` copy is the base the adapter was trained on (larger when the vocabulary was resized), so
    undoing it keeps it; a `modules_to_save` copy replaced the original, which only `--base` can bring back.
    """

    def __init__(self, adapter: Adapter, target: str, key: str, origin: str) -> None:
        super().__init__(adapter, target)
        self.key = key
        self.origin = origin
        self.kind = origin

    def adapter_keys(self) -> list[str]:
        return [self.key]

    @property
    def form(self) -> EditForm:
        shape = tuple(self.adapter.weights.shape(self.key))
        return EditForm("replacement", shape=shape, revert_needs_base=self.origin == "modules_to_save")

    def output_shape(self, shape: Shape) -> Shape:
        return self.adapter.weights.shape(self.key)

    def check(self, shape: Shape) -> str | None:
        new = self.adapter.weights.shape(self.key)
        if new == shape:
            return None
        # A resized vocabulary changes only the number of rows of an embedding or output head.
        if len(new) == len(shape) == 2 and new[1] == shape[1]:
            return None
        return f"{self.target}: adapter copy {tuple(new)} vs base {tuple(shape)}"

    def apply(self, weight: torch.Tensor, ctx: EditContext) -> torch.Tensor:
        return ctx.load(self.key)

    def revert(self, merged: torch.Tensor, ctx: EditContext, base: torch.Tensor | None = None) -> torch.Tensor:
        if self.origin == "base_layer":
            return merged
        if base is None:
            raise NotRevertibleError(
                f"{self.target} was replaced by the adapter's modules_to_save copy; the original is not in the merged "
                "checkpoint",
                path=self.adapter.ref,
                fix="pass --base BASE to take the original from the base model",
            )
        return base


class TokenRowsEdit(TensorEdit):
    """`trainable_token_indices`: the adapter's rows replace those rows of an embedding."""

    kind = "trainable_tokens"

    def __init__(self, adapter: Adapter, target: str, key: str, indices: list[int]) -> None:
        super().__init__(adapter, target)
        self.key = key
        self.indices = indices

    def adapter_keys(self) -> list[str]:
        return [self.key]

    @property
    def form(self) -> EditForm:
        shape = tuple(self.adapter.weights.shape(self.key))
        return EditForm("replacement", shape=shape, rows=True, revert_needs_base=True)

    def check(self, shape: Shape) -> str | None:
        rows = self.adapter.weights.shape(self.key)
        if len(shape) != 2 or rows != (len(self.indices), shape[1]):
            return f"{self.target}: {len(self.indices)} token rows {tuple(rows)} vs base {tuple(shape)}"
        if self.indices and max(self.indices) >= shape[0]:
            return f"{self.target}: token index {max(self.indices)} is past the {shape[0]} rows"
        return None

    def apply(self, weight: torch.Tensor, ctx: EditContext) -> torch.Tensor:
        index = torch.tensor(self.indices, device=weight.device)
        return weight.index_copy(0, index, ctx.load(self.key).to(weight.dtype))

    def revert(self, merged: torch.Tensor, ctx: EditContext, base: torch.Tensor | None = None) -> torch.Tensor:
        if base is None:
            raise NotRevertibleError(
                f"{self.target}: rows {self.indices[:5]} were replaced by trainable tokens; the originals are gone",
                path=self.adapter.ref,
                fix="pass --base BASE to take the original rows from the base model",
            )
        index = torch.tensor(self.indices, device=merged.device)
        return merged.index_copy(0, index, base.index_select(0, index).to(merged.dtype))


def token_indices_for(adapter: Adapter, module_path: str) -> list[int] | None:
    """The indices `trainable_token_indices` gives for a module: a list (the input embedding) or a dict by name."""
    spec = adapter.config.get("trainable_token_indices")
    if isinstance(spec, list):
        return [int(i) for i in spec]
    if isinstance(spec, dict):
        for name, indices in spec.items():
            if module_path == name or module_path.endswith("." + name):
                return [int(i) for i in indices]
    return None


def shared_edits(adapter: Adapter) -> list[TensorEdit]:
    """Full copies first (they set the starting tensor), then token rows; the type's own edits come after."""
    edits: list[TensorEdit] = []
    for target, key in adapter.full_tensors.items():
        origin = "base_layer" if "base_layer" in key.split(".") else "modules_to_save"
        edits.append(FullTensorEdit(adapter, target, key, origin))
    for module, key in adapter.token_rows.items():
        indices = token_indices_for(adapter, module)
        if indices is None:
            raise InputError(
                f"holds trainable token rows for {module} but trainable_token_indices does not name it",
                path=adapter.config_path,
                fix="the config and the weights do not belong together; re-save the adapter",
            )
        edits.append(TokenRowsEdit(adapter, f"{module}.weight", key, indices))
    return edits
