"""Run-time names (what PEFT's adapters name) versus stored names (what a checkpoint holds), by transformers' rules.

Transformers 5 renames and reshapes weights between the checkpoint and the module tree: a Qwen2-VL checkpoint
stores `model.layers.N...` where the model runs `model.language_model.layers.N...`, and a Qwen3-MoE checkpoint stores
`mlp.experts.N.gate_proj.weight` per expert where the model runs one fused `mlp.experts.gate_up_proj`. PEFT names
an adapter after the running model. The correspondence is not written here: it is read from transformers' own
conversion rules for the architecture (`conversion_mapping.get_model_conversion_mapping`, the list
`from_pretrained` applies at load and `save_pretrained` reverts at save), applied to a model built on the meta
device from the checkpoint's config.

- Renames come from the load direction: each stored key goes through `core_model_loading.rename_source_key`, as
  `from_pretrained` does for this very checkpoint, so the checkpoint's own layout (old or new) is what is matched.
- Fused parameters come from the save direction: `revert_weight_conversion` is run on probe tensors holding each
  element's coordinate along one axis, which tells, for every stored tensor the parameter is split into, which
  run-time index each stored element holds (an expert, a half, an interleave, a transpose).
"""

from __future__ import annotations

import re
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch

from lora_cli.adapters.base import TensorEdit
from lora_cli.errors import AdapterMismatchError
from lora_cli.io.checkpoint import CheckpointIndex
from lora_cli.io.safetensors_file import TensorInfo

# Probes are expanded views of one arange until a conversion copies them; int16 halves the copy when it fits.
_SMALL_PROBE_LIMIT = 2**15
_FULL_CHECK_LIMIT = 1 << 16
_SAMPLES = 1 << 12


@dataclass(frozen=True)
class StoredPiece:
    """Where one stored tensor's elements sit in a run-time parameter.

    `fixed` pins run-time axes to one index (the expert axis of a per-expert tensor); `axes[j]` says which run-time
    axis stored axis j runs along and at which run-time indices (a slice when they step evenly).
    """

    stored: str
    runtime: str
    fixed: tuple[tuple[int, int], ...]
    axes: tuple[tuple[int, slice | torch.Tensor], ...]

    @property
    def expert(self) -> int | None:
        """The expert (run-time axis 0 of a 3-D parameter) this stored tensor holds alone, if any."""
        return dict(self.fixed).get(0)

    def take(self, tensor: torch.Tensor, *, from_axis: int = 0) -> torch.Tensor:
        """This piece of `tensor`, laid out as stored. `tensor` holds run-time axes `from_axis...` (0: all of them)."""
        remaining = [axis for axis in range(from_axis, from_axis + tensor.dim())]
        for axis, index in sorted(self.fixed, reverse=True):
            if axis < from_axis:
                continue  # already selected by the caller (one expert's delta)
            tensor = tensor.select(remaining.index(axis), index)
            remaining.remove(axis)
        for axis, index in self.axes:
            dim = remaining.index(axis)
            if isinstance(index, slice):
                tensor = tensor[(slice(None),) * dim + (index,)]
            else:
                tensor = tensor.index_select(dim, index.to(tensor.device))
        order = [remaining.index(axis) for axis, _ in self.axes]
        return tensor.permute(order) if order != sorted(order) else tensor


class NamingError(AdapterMismatchError):
    """Adapter and checkpoint name the same weights differently in a way transformers' rules do not bridge."""


class NameMap:
    """transformers' correspondence for one checkpoint; built on first use (a meta model costs about a second)."""

    def __init__(self, base: CheckpointIndex) -> None:
        self.base = base
        self._pieces: dict[str, list[StoredPiece]] = {}
        self._structures: dict[tuple[str, tuple[int, ...]], tuple[list, list | None]] = {}

    @cached_property
    def stored_names(self) -> set[str]:
        return set(self.base.tensors)

    @cached_property
    def usable(self) -> bool:
        """Whether the checkpoint names an architecture transformers has rules for (else names are taken as given)."""
        import transformers

        config = self.base.config() or {}
        return bool(self.architecture and "model_type" in config and hasattr(transformers, self.architecture))

    @cached_property
    def architecture(self) -> str | None:
        config = self.base.config() or {}
        architectures = config.get("architectures") or []
        return str(architectures[0]) if architectures else None

    @cached_property
    def model(self) -> torch.nn.Module:
        import transformers

        config = self.base.config()
        if not config or not self.architecture or "model_type" not in config:
            raise NamingError(
                "the checkpoint has no config.json naming its architecture, so run-time names cannot be mapped",
                path=self.base.directory,
                fix="pass a base saved by transformers (with config.json)",
            )
        cls = getattr(transformers, self.architecture, None)
        if cls is None:
            raise NamingError(
                f"transformers {transformers.__version__} does not know the architecture {self.architecture}",
                path=self.base.directory / "config.json",
                fix="upgrade transformers, or use an adapter saved with the checkpoint's own names",
            )
        fields = {k: v for k, v in config.items() if k not in ("architectures", "transformers_version")}
        try:
            model_config = transformers.AutoConfig.for_model(**fields)
            with torch.device("meta"):
                return cls(model_config)
        except Exception as exc:  # any config transformers cannot build is the same answer: no known mapping
            raise NamingError(
                f"transformers cannot build {self.architecture} from this config.json ({type(exc).__name__}: {exc})",
                path=self.base.directory / "config.json",
                fix="repair config.json, or use an adapter saved with the checkpoint's own names",
            ) from None

    @cached_property
    def conversions(self) -> list:
        from transformers.conversion_mapping import get_model_conversion_mapping

        return get_model_conversion_mapping(self.model)

    @cached_property
    def runtime_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(tensor.shape) for name, tensor in self.model.state_dict().items()}

    @cached_property
    def renamed(self) -> dict[str, str]:
        """Run-time name -> stored name, for stored keys `from_pretrained` renames without reshaping."""
        from transformers.core_model_loading import WeightConverter, rename_source_key

        renamings = [c for c in self.conversions if not isinstance(c, WeightConverter)]
        converters = [c for c in self.conversions if isinstance(c, WeightConverter)]
        meta_state = self.runtime_shapes
        found: dict[str, str] = {}
        for stored in self.base.tensors:
            runtime, pattern = rename_source_key(
                stored, renamings, converters, self.model.base_model_prefix, meta_state
            )
            if pattern is None:
                found.setdefault(runtime, stored)
        return found

    def describe(self) -> str:
        """How the two sides name things, for messages."""
        rules = self.architecture or "no architecture"
        return f"transformers' conversion rules for {rules}"

    def unknown(self, what: str) -> NamingError:
        """The refusal for an architecture whose run-time-to-stored correspondence transformers does not give."""
        import transformers

        arch = self.architecture or "(none named in config.json)"
        return NamingError(
            f"architecture {arch}: transformers {transformers.__version__} has no model definition for it, so "
            f"{what} is unknown",
            path=self.base.directory / "config.json",
            fix="use a transformers that knows this architecture, or a base saved with the adapter's own names",
        )

    def contrast(self, runtime: str) -> str:
        """Which naming each side uses, for a name that did not line up."""
        tail = ".".join(strip_digits(runtime).split(".")[-3:])
        like = next((n for n in self.base.tensors if strip_digits(n).endswith(tail)), None)
        like = like or next(iter(self.base.tensors), "nothing")
        side = f"the adapter names {runtime} (the running model's name); the checkpoint stores names like {like}"
        if not self.usable:
            arch = self.architecture or "no architecture"
            return f"{side}, and its config names {arch}, for which this transformers has no conversion rules"
        return f"{side}, and {self.describe()} do not map one onto the other"

    def stored_name(self, runtime: str) -> str | None:
        """The stored tensor a run-time weight is read from unchanged, or None."""
        return self.renamed.get(runtime)

    def pieces(self, runtime: str) -> list[StoredPiece]:
        """Every stored tensor the run-time parameter `runtime` is split into when saved; [] if it is not one."""
        if runtime not in self._pieces:
            self._pieces[runtime] = self._probe(runtime) if runtime in self.runtime_shapes else []
        return self._pieces[runtime]

    def registration_order(self, module_path: str) -> list[str]:
        """The direct parameters of a run-time module, in the order it registers them (PEFT nests wrappers so)."""
        try:
            module = self.model.get_submodule(module_path)
        except AttributeError:
            return []
        return [name for name, _ in module.named_parameters(recurse=False)]

    def is_transposed(self, module_path: str) -> bool:
        """transformers marks expert modules whose weights run as [E, in, out] (PEFT reads the same flag)."""
        try:
            return bool(getattr(self.model.get_submodule(module_path), "is_transposed", False))
        except AttributeError:
            return False

    def _probe(self, runtime: str) -> list[StoredPiece]:
        """The stored pieces of `runtime`, read off transformers' save-time conversion.

        The conversion first runs on a meta tensor (free) for the names and shapes it writes. The coordinates
        need real probes, which cost a copy of the parameter's size, so they are taken once per structure
        (`layers.#.mlp.experts.gate_up_proj` of one shape) and reused for every layer, matched output by output.
        """
        from transformers.core_model_loading import revert_weight_conversion

        shape = self.runtime_shapes[runtime]
        try:
            meta = revert_weight_conversion(self.model, {runtime: torch.empty(shape, device="meta")})
        except Exception:  # a conversion that cannot run on this parameter alone: no plain split to find
            return []
        outputs = [(name, tuple(tensor.shape)) for name, tensor in meta.items()]
        key = (strip_digits(runtime), shape)
        if key not in self._structures:
            self._structures[key] = (outputs, self._coordinates(runtime, shape, outputs))
        template_outputs, template = self._structures[key]
        if template is None or [s for _, s in outputs] != [s for _, s in template_outputs]:
            return []
        pieces: list[StoredPiece] = []
        for (name, out_shape), (fixed, axes) in zip(outputs, template, strict=True):
            stored = _stored_key(name, self.stored_names)
            if stored is None or tuple(self.base.tensors[stored].shape) != out_shape:
                return []
            pieces.append(StoredPiece(stored, runtime, fixed, axes))
        return pieces

    def _coordinates(
        self, runtime: str, shape: tuple[int, ...], outputs: list[tuple[str, tuple[int, ...]]]
    ) -> list[tuple[tuple[tuple[int, int], ...], tuple[tuple[int, slice | torch.Tensor], ...]]] | None:
        """For each output of the conversion: the run-time axes it fixes and the run-time axis along each of its axes.

        One probe per run-time axis holds each element's coordinate along that axis; after the conversion, an
        output's probe is either constant (the axis is fixed, e.g. one expert) or varies along exactly one output
        axis, where it lists the run-time indices (a half, an interleave). Anything else is not a plain split.
        """
        from transformers.core_model_loading import revert_weight_conversion

        dtype = torch.int16 if max(shape, default=0) < _SMALL_PROBE_LIMIT else torch.int32
        names = [name for name, _ in outputs]
        fixed: dict[str, list[tuple[int, int]]] = {name: [] for name in names}
        along: dict[str, dict[int, tuple[int, slice | torch.Tensor]]] = {name: {} for name in names}
        for axis, size in enumerate(shape):
            view = [1] * len(shape)
            view[axis] = size
            probe = torch.arange(size, dtype=dtype).view(view).expand(shape)
            try:
                converted = revert_weight_conversion(self.model, {runtime: probe})
            except Exception:
                return None
            if list(converted) != names:
                return None
            for name, values in converted.items():
                found = _axis_map(values)
                if found is None:
                    return None
                if isinstance(found, int):
                    fixed[name].append((axis, found))
                elif found[0] in along[name]:
                    return None
                else:
                    along[name][found[0]] = (axis, found[1])
            del converted
        result = []
        for name, out_shape in outputs:
            ndim = len(out_shape)
            if set(along[name]) != set(range(ndim)):
                return None
            result.append((tuple(fixed[name]), tuple(along[name][j] for j in range(ndim))))
        return result


def _stored_key(name: str, stored: set[str]) -> str | None:
    from lora_cli.plan import resolve_target

    return resolve_target(name, stored)


def _axis_map(values: torch.Tensor) -> int | tuple[int, slice | torch.Tensor] | None:
    """A probe after conversion: its constant (a fixed run-time index), or the one output axis it runs along and
    the run-time indices there; None when it varies along several axes or not as one line."""
    if values.dim() == 0:
        return int(values)
    first = int(values[(0,) * values.dim()])
    lines = {}
    for j in range(values.dim()):
        if values.shape[j] > 1 and values.stride(j) != 0:
            line = values[tuple(slice(None) if d == j else 0 for d in range(values.dim()))]
            if not bool((line == first).all()):
                lines[j] = line.to(torch.int64)
    # Still a view of the expanded probe (no conversion copied it): it can only vary where its stride is not 0,
    # and along one such axis it is a line by construction. A copied output is checked.
    viewed = any(values.stride(j) == 0 for j in range(values.dim()) if values.shape[j] > 1)
    if not lines:
        return first if viewed or _is_line(values, 0, torch.full((values.shape[0],), first)) else None
    if len(lines) != 1:
        return None
    j, line = next(iter(lines.items()))
    if not viewed and not _is_line(values, j, line):
        return None
    return j, _as_slice(line)


def _is_line(values: torch.Tensor, dim: int, line: torch.Tensor) -> bool:
    """Whether `values` is `line` along `dim`, repeated along every other axis.

    Checked in full up to 65536 elements; beyond, at the corners and a fixed sample of 4096 positions
    (transformers' conversions are splits, slices, interleaves and transposes, which either hold everywhere or
    fail on most elements), because a full check of every expert of a large model takes minutes.
    """
    if values.numel() <= _FULL_CHECK_LIMIT:
        shape = [-1 if d == dim else 1 for d in range(values.dim())]
        return torch.equal(values, line.to(values.dtype).view(shape).expand(values.shape))
    generator = torch.Generator().manual_seed(0)
    samples = [torch.randint(0, size, (_SAMPLES,), generator=generator) for size in values.shape]
    for d, size in enumerate(values.shape):
        samples[d][: 2 ** values.dim()] = torch.tensor(
            [(size - 1) * ((corner >> d) & 1) for corner in range(2 ** values.dim())]
        )[:_SAMPLES]
    return torch.equal(values[tuple(samples)].to(torch.int64), line[samples[dim]])


def _as_slice(line: torch.Tensor) -> slice | torch.Tensor:
    """An evenly stepping index as a slice (so taking it is a view), else the index itself."""
    if line.numel() == 1:
        return slice(int(line[0]), int(line[0]) + 1, 1)
    step = int(line[1] - line[0])
    start = int(line[0])
    if step > 0 and torch.equal(line, torch.arange(start, start + step * line.numel(), step)):
        return slice(start, start + step * line.numel(), step)
    return line


def strip_digits(name: str) -> str:
    """A name with its layer and expert numbers blanked, to group repeated structures."""
    return re.sub(r"\.\d+(?=\.|$)", ".#", name)


class RuntimeParamEdit(TensorEdit):
    """An edit written against a run-time parameter that the checkpoint may store renamed, split or fused.

    `bind` fixes what the edit needs to know of the running model (which parameter, its layout, its dtype);
    `piece_edit` gives the edit of one stored tensor holding part of the parameter.
    """

    @abstractmethod
    def bind(self, names: NameMap, stored: Callable[[str], TensorInfo | None]) -> None:
        """Settle the run-time parameter (`target`); `stored(name)` is the base tensor a run-time name is stored
        as whole, or None."""

    @abstractmethod
    def piece_edit(self, piece: StoredPiece, stored: TensorInfo) -> TensorEdit:
        """The part of this edit that lands on the stored tensor `piece.stored`."""


def place(edits: list[TensorEdit], base: CheckpointIndex, names: NameMap) -> tuple[list[TensorEdit], list[TensorEdit]]:
    """Give every edit the stored tensor it lands on; a fused parameter's edit becomes one edit per stored piece.

    Names the base stores (give or take a head's backbone prefix) are taken as they are; others go through
    transformers' rules. Returns the placed edits (targets are stored names) and the edits left unplaced.
    """
    from lora_cli.plan import resolve_target

    stored_names = set(base.tensors)
    placed: list[TensorEdit] = []
    missing: list[TensorEdit] = []

    def stored_as(name: str) -> str | None:
        found = resolve_target(name, stored_names)
        return names.stored_name(name) if found is None and names.usable else found

    for edit in edits:
        if isinstance(edit, RuntimeParamEdit):
            edit.bind(names, lambda name: base.tensors[found] if (found := stored_as(name)) else None)
        stored = stored_as(edit.target)
        if isinstance(edit, RuntimeParamEdit):
            pieces = names.pieces(edit.target) if stored is None and names.usable else []
            if pieces:
                placed.extend(edit.piece_edit(piece, base.tensors[piece.stored]) for piece in pieces)
                continue
        if stored is None:
            missing.append(edit)
            continue
        edit.target = stored
        placed.append(edit)
    return placed, missing
