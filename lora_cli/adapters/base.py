"""The interface every adapter type implements: adapters, their modules, and the edits they make to base tensors.

An adapter type turns a loaded adapter into `TensorEdit`s, one per base tensor it changes. Each edit describes its
form (`EditForm`: additive, replacement or transform, with its factors where it has them), so the engine, `memory`,
`inspect` and `unmerge` ask the edit rather than which type made it. The registry is `registry.py`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch

from lora_cli.errors import NonFiniteError, NotRevertibleError
from lora_cli.filenames import ADAPTER_CONFIG
from lora_cli.numerics import all_finite
from lora_cli.patterns import pattern_value

Shape = tuple[int, ...]
# (start, stop, into) -> rows [start, stop) of an additive edit's delta, written into `into` (see `row_delta`).
RowDelta = Callable[[int, int, torch.Tensor], torch.Tensor]
# The module path under which tensors saved once for the whole model are grouped, not per module.
SHARED_MODULE = ""


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

    @abstractmethod
    def check_unchanged(self) -> None:
        """Refuse, naming the file, when it was modified or replaced since it was opened (see io/files.py)."""

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
    def config_path(self) -> Path:
        return self.directory / ADAPTER_CONFIG

    @property
    def label(self) -> str:
        return self.ref if self.weight == 1.0 else f"{self.ref}@{self.weight:g}"

    def pattern_value(self, pattern_key: str, module_path: str, default: object) -> object:
        """Look up `rank_pattern`/`alpha_pattern`-style overrides with PEFT's matching rule (suffix match)."""
        return pattern_value(self.config, pattern_key, module_path, default, path=self.config_path)


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
    # The base tensor's dtype as stored, for the types PEFT computes partly in it (OSF, FRoD, GLoRA).
    stored_dtype: torch.dtype | None = None

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


@dataclass(frozen=True)
class LowRank:
    """A delta that is `scale * left @ right`, from two adapter tensors: PEFT's `B @ A`, or `(B @ A).T` when the
    layer stores its weight transposed (`fan_in_fan_out`, embeddings), which is `A.T @ B.T`."""

    a_key: str
    b_key: str
    rank: int
    scale: float  # PEFT's scaling times the user's ADAPTER@w
    transposed: bool = False

    def load(self, ctx: EditContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(left, right) in the context's precision, so that the delta is `scale * left @ right`."""
        a, b = ctx.load(self.a_key), ctx.load(self.b_key)
        return (a.T, b.T) if self.transposed else (b, a)


@dataclass(frozen=True)
class EditForm:
    """What an edit does to its tensor, so that callers ask instead of probing.

    - "additive": W + delta, where `delta` depends on W's shape only (`TensorEdit.delta` gives it, scaled);
    - "replacement": the adapter's values replace the tensor (or, with `rows`, some of its rows);
    - "transform": anything else (a product, a rotation, DoRA's rescale): only `apply` can tell.
    `shape` (or, when only the element count is known, `numel`) is what the adapter alone says of the delta or
    the replacement; `low_rank` is set where the delta (or, for DoRA, its inner update) is a product of factors.
    """

    kind: Literal["additive", "replacement", "transform"]
    shape: Shape | None = None
    numel: int | None = None
    rank: int | None = None
    scale: float | None = None
    low_rank: LowRank | None = None
    rows: bool = False
    revert_needs_base: bool = False
    # An additive delta that can be formed a block of rows at a time (`TensorEdit.row_delta`) with the same bytes
    # as the whole: the engine then adds it to W block by block, in cache, never holding a weight-sized delta.
    row_blocks: bool = False

    @property
    def is_additive(self) -> bool:
        return self.kind == "additive"


class TensorEdit(ABC):
    """What one adapter does to one base tensor. `apply` gets and returns working precision on the device.

    `apply` and `revert` may work in place on the tensor they are given: the engine hands them its own copy.
    `form` says which kind of change it is; additive edits also give their `delta` on its own.
    """

    adapter: Adapter
    target: str
    kind: str = "delta"

    def __init__(self, adapter: Adapter, target: str) -> None:
        self.adapter = adapter
        self.target = target

    @property
    def form(self) -> EditForm:
        return EditForm("transform")

    def output_shape(self, shape: Shape) -> Shape:
        """The shape the tensor has after this edit (only resized embeddings change it)."""
        return shape

    def delta(self, shape: Shape, ctx: EditContext) -> torch.Tensor:
        """For an additive edit, the delta it adds to a base tensor of `shape` (ADAPTER@w applied)."""
        raise TypeError(f"{type(self).__name__} is not additive ({self.form.kind})")

    def row_delta(self, shape: Shape, ctx: EditContext) -> RowDelta:
        """Where `form.row_blocks`: the delta's rows on demand. The factors are loaded once, here; the function
        returned writes rows [start, stop) of `delta(shape, ctx)`, bit for bit, into `into` and returns them."""
        raise TypeError(f"{type(self).__name__} does not form its delta by rows")

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

    def describe(self) -> str:
        return self.kind


class AdapterKind(ABC):
    """One PEFT adapter type: which tensor names are its own, and how each adapted module becomes edits."""

    peft_type: ClassVar[str]
    # First name segments of this type's parameters, e.g. {"lora_A", "lora_B"}: how keys are grouped by module.
    param_roots: ClassVar[frozenset[str]]

    def edits(self, adapter: Adapter, base_shape: Callable[[str], Shape | None]) -> list[TensorEdit]:
        """Edits for every module of `adapter`. `base_shape(name)` gives a base tensor's shape, None if absent."""
        self.check_adapter(adapter)
        edits: list[TensorEdit] = []
        for module in adapter.modules.values():
            if module.path != SHARED_MODULE:
                edits.extend(self.module_edits(adapter, module, base_shape))
        return edits

    def check_adapter(self, adapter: Adapter) -> None:
        """Refuse what is wrong with the adapter as a whole (a missing shared tensor, a weight it cannot scale)."""
        return None

    @abstractmethod
    def module_edits(
        self, adapter: Adapter, module: AdapterModule, base_shape: Callable[[str], Shape | None]
    ) -> list[TensorEdit]:
        """The edits of one adapted module."""

    def shared_params(self, adapter: Adapter) -> dict[str, str]:
        """Tensors saved once for the whole model (VeRA's projections, VB-LoRA's bank), by parameter name."""
        shared = adapter.modules.get(SHARED_MODULE)
        return dict(shared.params) if shared else {}
