"""Tensors PEFT does not save but draws again from a saved seed (VeRA's and RandLoRA's shared projections when
`save_projection=False`): drawn once by the type, then read like the adapter's own tensors.

`with_tensors` wraps the adapter's weights so that the drawn tensors have keys of their own (`regenerated:...`),
and files them under the shared module, where the saved ones would be.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lora_cli.adapters.base import SHARED_MODULE, Adapter, AdapterModule, AdapterWeights, EditContext, Shape
from lora_cli.errors import UnsupportedAdapterError

PREFIX = "regenerated:"


class RegeneratedWeights(AdapterWeights):
    """The adapter file's tensors plus the ones drawn again from its seed."""

    def __init__(self, inner: AdapterWeights) -> None:
        self.inner = inner
        self.path = inner.path
        self.drawn: dict[str, torch.Tensor] = {}

    def keys(self) -> list[str]:
        return [*self.inner.keys(), *self.drawn]

    def shape(self, key: str) -> Shape:
        return tuple(self.drawn[key].shape) if key in self.drawn else self.inner.shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self.drawn[key].dtype if key in self.drawn else self.inner.dtype(key)

    def load(self, key: str) -> torch.Tensor:
        # A copy: edits may work in place on what they load.
        return self.drawn[key].clone() if key in self.drawn else self.inner.load(key)

    def check_unchanged(self) -> None:
        self.inner.check_unchanged()


def with_tensors(adapter: Adapter, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Add drawn tensors, by parameter name, to the adapter's shared module; returns that module's params."""
    if not isinstance(adapter.weights, RegeneratedWeights):
        adapter.weights = RegeneratedWeights(adapter.weights)
    shared = adapter.modules.get(SHARED_MODULE)
    params = dict(shared.params) if shared else {}
    for name, tensor in tensors.items():
        key = f"{PREFIX}{name}"
        adapter.weights.drawn[key] = tensor
        params[name] = key
    adapter.modules[SHARED_MODULE] = AdapterModule(SHARED_MODULE, params)
    return params


def largest_shape(adapter: Adapter, base_shape: Callable[[str], Shape | None], drawn: str) -> tuple[int, int]:
    """PEFT's `_find_dim`: the largest (out, in) over the adapted layers, each side on its own, which sizes the
    random `drawn` tensors (VeRA's projections, RandLoRA's bases) when they were not saved."""
    fan_in_fan_out = bool(adapter.config.get("fan_in_fan_out"))
    shapes = []
    for path in adapter.modules:
        if path == SHARED_MODULE:
            continue
        shape = base_shape(f"{path}.weight")
        if shape is None or len(shape) != 2:
            raise UnsupportedAdapterError(
                f"this {adapter.peft_type} adapter was saved without its {drawn} (save_projection=False); PEFT draws "
                f"them again sized by the adapted layers, and {path}.weight is not a 2-D tensor of the base",
                path=adapter.weights.path,
                fix="pass the base it was trained on (--base for inspect), or re-save it with save_projection=True",
            )
        shapes.append((shape[1], shape[0]) if fan_in_fan_out else tuple(shape))
    return max(shape[0] for shape in shapes), max(shape[1] for shape in shapes)


def load(ctx: EditContext, key: str) -> torch.Tensor:
    """A tensor of the adapter; a drawn one as PEFT holds it, moved to the base layer's dtype with the adapter."""
    tensor = ctx.load(key)
    if key.startswith(PREFIX) and ctx.stored_dtype is not None:
        tensor = tensor.to(ctx.stored_dtype).to(tensor.dtype)
    return tensor
