"""The interface every adapter type implements, and the registry that maps `peft_type` to it.

An adapter type turns a loaded adapter into `TensorEdit`s, one per base tensor it changes. The merge engine
only ever calls `apply` (and unmerge `revert`) on edits; it never asks which type made them.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from lora_cli.errors import NonFiniteError, NotRevertibleError, UnsupportedAdapterError
from lora_cli.numerics import all_finite

Shape = tuple[int, ...]


class AdapterWeights(ABC):
    """The tensors of an adapter file, read lazily so that only one module's factors are in memory at a time."""

    path: Path

    @abstractmethod
    def keys(self) -> list[str]: ...

    @abstractmethod
    def shape(self, key: str) -> Shape: ...

    @abstractmethod
    def dtype(self, key: str) -> torch.dtype: ...

    @abstractmethod
    def load(self, key: str) -> torch.Tensor:
        """The tensor as stored (CPU, its own dtype)."""

    def nbytes(self, key: str) -> int:
        numel = 1
        for dim in self.shape(key):
            numel *= dim
        return numel * self.dtype(key).itemsize


@dataclass(frozen=True)
class AdapterModule:
    """One adapted module of the base: its adapter tensors by parameter name ("lora_A.weight", "hada_w1_a")."""

    path: str
    params: dict[str, str]

    def has(self, param: str) -> bool:
        return param in self.params


@dataclass
class Adapter:
    """A loaded adapter: config, lazily read weights, and its tensors grouped by the module they adapt."""

    ref: str
    directory: Path
    config: dict
    weights: AdapterWeights
    modules: dict[str, AdapterModule]
    # Base tensor name -> adapter key of full tensors the adapter carries: `modules_to_save` copies and the
    # `base_layer` copies PEFT saves for targeted (possibly resized) embeddings.
    full_tensors: dict[str, str] = field(default_factory=dict)
    # Row replacements from `trainable_token_indices`: module path -> adapter key of the new rows.
    token_rows: dict[str, str] = field(default_factory=dict)
    # The user's multiplier, from `ADAPTER@0.7`: the delta is scaled by it.
    weight: float = 1.0
    revision: str | None = None
    commit: str | None = None

    @property
    def peft_type(self) -> str:
        return str(self.config.get("peft_type", "")).upper()

    @property
    def label(self) -> str:
        return self.ref if self.weight == 1.0 else f"{self.ref}@{self.weight:g}"

    def pattern_value(self, pattern_key: str, module_path: str, default: object) -> object:
        """Look up `rank_pattern`/`alpha_pattern`-style overrides with PEFT's matching rule (suffix match)."""
        pattern = self.config.get(pattern_key) or {}
        for key, value in pattern.items():
            if re.match(rf"(.*\.)?({key})$", module_path):
                return value
        return default


@dataclass
class Workspace:
    """Reusable buffers for the working tensors of one compute thread.

    A fresh fp32 tensor the size of a weight costs page faults on every allocation (the allocator hands large
    blocks back to the kernel); reusing a few buffers keeps both time and peak memory down.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: Shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = 1
        for dim in shape:
            numel *= dim
        flat = self._buffers.get(name)
        if flat is None or flat.numel() < numel or flat.dtype != dtype or flat.device != device:
            # Drop the old buffer before allocating its successor, or both are alive at once.
            del flat
            self._buffers.pop(name, None)
            flat = self._buffers[name] = torch.empty(numel, dtype=dtype, device=device)
        return flat[:numel].view(shape)


@dataclass
class EditContext:
    """What an edit may use while it runs: the device, the adapter tensors (loaded on demand), scratch buffers."""

    adapter: Adapter
    device: torch.device
    work_dtype: torch.dtype = torch.float32
    workspace: Workspace | None = None

    def scratch(self, name: str, shape: Shape) -> torch.Tensor | None:
        """A reusable working-precision buffer, or None when the caller runs without a workspace."""
        if self.workspace is None:
            return None
        return self.workspace.take(name, shape, self.work_dtype, self.device)

    def load(self, key: str) -> torch.Tensor:
        """An adapter tensor on the working device; floating tensors in working precision (at least fp32)."""
        tensor = self.adapter.weights.load(key)
        # Every command that reads adapter values comes through here, so a broken adapter is named at once.
        if not all_finite(tensor):
            raise NonFiniteError(
                f"adapter tensor {key} holds NaN or Inf",
                path=self.adapter.weights.path,
                fix="the adapter is broken (training diverged?); use an earlier checkpoint or retrain it",
            )
        # Uploaded as stored, then converted on the device: a converting upload goes through a pageable temporary.
        return tensor.to(self.device).to(self.work_dtype) if tensor.is_floating_point() else tensor.to(self.device)


class TensorEdit(ABC):
    """What one adapter does to one base tensor. `apply` gets and returns working precision on the device.

    `apply` and `revert` may work in place on the tensor they are given: the engine hands them its own copy.
    """

    adapter: Adapter
    target: str
    kind: str = "delta"

    def __init__(self, adapter: Adapter, target: str) -> None:
        self.adapter = adapter
        self.target = target

    def output_shape(self, shape: Shape) -> Shape:
        """The shape the tensor has after this edit (only resized embeddings change it)."""
        return shape

    def additive_delta(self, shape: Shape, ctx: EditContext) -> torch.Tensor | None:
        """For edits that are W + delta, the delta (so the engine can fuse the add with the rounding); else None."""
        return None

    def check(self, shape: Shape) -> str | None:
        """Why this edit cannot apply to a base tensor of `shape`, or None when it fits."""
        return None

    def adapter_keys(self) -> list[str]:
        """The adapter tensors this edit reads (to size memory and to count parameters)."""
        return []

    @abstractmethod
    def apply(self, weight: torch.Tensor, ctx: EditContext) -> torch.Tensor: ...

    def revert(self, merged: torch.Tensor, ctx: EditContext, base: torch.Tensor | None = None) -> torch.Tensor:
        """Undo `apply`. `base` is the original tensor when the user supplied the base (`--base`)."""
        raise NotRevertibleError(f"{type(self).__name__} edits cannot be undone", path=self.adapter.ref)

    def needs_base_to_revert(self) -> bool:
        return False

    def describe(self) -> str:
        return self.kind


class AdapterKind(ABC):
    """One PEFT adapter type: which tensor names are its own, and how they become edits."""

    peft_type: ClassVar[str]
    # First name segments of this type's parameters, e.g. {"lora_A", "lora_B"}: how keys are grouped by module.
    param_roots: ClassVar[frozenset[str]]

    @abstractmethod
    def edits(self, adapter: Adapter, base_shape: Callable[[str], Shape | None]) -> list[TensorEdit]:
        """Edits for every module of `adapter`. `base_shape(name)` gives a base tensor's shape, None if absent."""


REGISTRY: dict[str, AdapterKind] = {}

# Types PEFT can merge that loractl refuses by name; filled by modules that know why.
REFUSED: dict[str, str] = {}


def register(kind: type[AdapterKind]) -> type[AdapterKind]:
    REGISTRY[kind.peft_type] = kind()
    return kind


def kind_for(adapter: Adapter) -> AdapterKind:
    from lora_cli.adapters import registry  # noqa: F401 - importing it registers every type

    peft_type = adapter.peft_type
    if peft_type in REGISTRY:
        return REGISTRY[peft_type]
    reason = REFUSED.get(peft_type, "loractl does not merge this adapter type")
    raise UnsupportedAdapterError(
        f"adapter type {peft_type or '(none)'} is not supported: {reason}",
        path=adapter.directory / "adapter_config.json",
        fix="see README for the supported types",
    )


def all_param_roots() -> frozenset[str]:
    from lora_cli.adapters import registry  # noqa: F401

    roots: set[str] = set()
    for kind in REGISTRY.values():
        roots |= kind.param_roots
    return frozenset(roots)
