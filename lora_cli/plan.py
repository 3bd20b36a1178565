"""Map a list of adapters onto a base checkpoint: which edits land on which tensor, and what gets written.

Everything that can be wrong with the pairing (a target missing from the base, a shape that does not fit, an
adapter for another model) is found here, before a byte is written. Merge and unmerge share this plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lora_cli.adapters.base import Adapter, Shape, TensorEdit
from lora_cli.adapters.common import shared_edits
from lora_cli.adapters.registry import kind_for
from lora_cli.errors import AdapterMismatchError, InputError
from lora_cli.io.checkpoint import CheckpointIndex
from lora_cli.io.dtypes import NAMED_DTYPES, TORCH_TO_SAFETENSORS, is_float
from lora_cli.io.safetensors_file import TensorInfo
from lora_cli.io.writer import OutputTensor
from lora_cli.naming import NameMap, place
from lora_cli.ties import TiePolicy, attach_heads, is_embedding, is_head, is_tied

# transformers prefixes the backbone differently in task heads and bare models; adapters follow the head.
PREFIXES = ("model.", "transformer.", "base_model.")


@dataclass
class PlannedTensor:
    """One output tensor: where its input bytes come from and the edits applied to them, in order."""

    name: str
    source: TensorInfo
    edits: list[TensorEdit]
    output: OutputTensor

    @property
    def is_copy(self) -> bool:
        return not self.edits and self.output.dtype == self.source.dtype and self.source.stored


@dataclass
class MergePlan:
    base: CheckpointIndex
    adapters: list[Adapter]
    tensors: list[PlannedTensor]
    untied: list[str] = field(default_factory=list)
    # Heads dropped again (unmerge): the written config ties them back to the embedding.
    retied: list[str] = field(default_factory=list)
    vocab_size: int | None = None
    warnings: list[str] = field(default_factory=list)
    # A quantized base written in its own format (--requantize, lora_cli/quant/requantize.py), not dequantized.
    keeps_quantization: bool = False

    @property
    def edited(self) -> list[PlannedTensor]:
        return [t for t in self.tensors if t.edits]

    @property
    def output_bytes(self) -> int:
        return sum(t.output.nbytes for t in self.tensors)

    def check_inputs_unchanged(self) -> None:
        """Refuse, naming the file, when a base shard or adapter file was modified or replaced while read."""
        self.base.check_unchanged()
        for adapter in self.adapters:
            adapter.weights.check_unchanged()


def resolve_target(name: str, names: set[str]) -> str | None:
    """The base tensor an adapter target names, allowing for a head's backbone prefix present or absent."""
    if name in names:
        return name
    for prefix in PREFIXES:
        if name.startswith(prefix) and name[len(prefix) :] in names:
            return name[len(prefix) :]
        if prefix + name in names:
            return prefix + name
    return None


def output_dtype(info: TensorInfo, requested: str) -> str:
    """`auto` keeps each tensor's dtype; a named dtype converts floating tensors and leaves integer ones. A
    dequantized weight's `auto` is the model's compute dtype (its dequantized dtype may be wider)."""
    if requested == "auto" and not info.stored:
        return info.output_dtype  # type: ignore[attr-defined]
    if requested == "auto" or not is_float(info.dtype):
        return info.dtype
    return TORCH_TO_SAFETENSORS[NAMED_DTYPES[requested]]


def collect_edits(adapters: list[Adapter], base: CheckpointIndex, naming: NameMap | None = None) -> list[TensorEdit]:
    names = set(base.tensors)
    naming = naming or NameMap(base)

    def base_shape(name: str) -> Shape | None:
        found = resolve_target(name, names) or (naming.stored_name(name) if naming.usable else None)
        return base.tensors[found].shape if found else None

    edits: list[TensorEdit] = []
    for adapter in adapters:
        edits.extend(shared_edits(adapter))
        edits.extend(kind_for(adapter).edits(adapter, base_shape))
    return edits


def build_plan(
    base: CheckpointIndex, adapters: list[Adapter], *, dtype: str = "auto", ties: TiePolicy = "untie"
) -> MergePlan:
    """Attach every edit to its base tensor, place a tied head's edits by the tie policy (`lora_cli.ties`), and
    check every shape."""
    names = set(base.tensors)
    config = base.config()
    plan = MergePlan(base=base, adapters=adapters, tensors=[])
    by_target: dict[str, list[TensorEdit]] = {}
    naming = NameMap(base)
    # The hook where run-time names meet stored ones: renamed, split or fused by transformers' rules (naming.py).
    edits, unplaced = place(collect_edits(adapters, base, naming), base, naming)
    missing: list[str] = []
    for edit in unplaced:
        if is_head(edit.target) and is_tied(config):
            edits.append(edit)  # a tied head: `attach_heads` places its edits
        else:
            missing.append(edit.target)
    for edit in edits:
        by_target.setdefault(edit.target, []).append(edit)

    extra = attach_heads(plan, by_target, names, config, missing, ties)
    if missing:
        raise _mismatch(adapters, base, missing, "name tensors the base does not have", naming)

    misfits: list[str] = []
    for name, info in [*base.tensors.items(), *extra.items()]:
        chain = by_target.get(name, [])
        shape = info.shape
        for edit in chain:
            problem = edit.check(shape)
            if problem:
                misfits.append(problem)
                break
            shape = edit.output_shape(shape)
        if chain and not is_float(info.dtype):
            raise InputError(f"adapter targets {name}, a {info.dtype} tensor", path=info.file)
        out = OutputTensor(name, output_dtype(info, dtype), tuple(shape))
        plan.tensors.append(PlannedTensor(name, info, chain, out))
        if chain and shape[0] != info.shape[0] and (is_embedding(name) or is_head(name)):
            plan.vocab_size = max(plan.vocab_size or 0, shape[0])
    if misfits:
        raise _mismatch(adapters, base, misfits, "do not fit the base's shapes")
    _order_extras(plan, extra)
    return plan


def _order_extras(plan: MergePlan, extra: dict[str, TensorInfo]) -> None:
    """Untied heads are written right after the embedding they were tied to, in the same shard."""
    for head, embedding in extra.items():
        head_entry = next(t for t in plan.tensors if t.name == head)
        plan.tensors.remove(head_entry)
        at = next(i for i, t in enumerate(plan.tensors) if t.name == embedding.name)
        plan.tensors.insert(at + 1, head_entry)


def _mismatch(
    adapters: list[Adapter], base: CheckpointIndex, problems: list[str], what: str, naming: NameMap | None = None
) -> AdapterMismatchError:
    sample = "; ".join(problems[:3])
    more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
    trained_on = {a.config.get("base_model_name_or_path") for a in adapters} - {None, ""}
    origin = f" (it was trained on {', '.join(sorted(map(str, trained_on)))})" if trained_on else ""
    namings = f"; {naming.contrast(problems[0])}" if naming is not None else ""
    return AdapterMismatchError(
        f"{len(problems)} adapter tensors {what}: {sample}{more}{namings}",
        path=", ".join(a.ref for a in adapters),
        fix=f"is this adapter for another base model{origin}? pass the base it was trained on",
    )


def working_dtype(info: TensorInfo) -> torch.dtype:
    """At least fp32; fp64 bases keep fp64."""
    return torch.float64 if info.dtype == "F64" else torch.float32
