"""What every command opens first: resolved sources, the adapters they hold, and the plan that lands them.

merge, unmerge, diff, memory and inspect all start the same way (open the checkpoint, load the adapters, build
the plan); `prepare` is that opening, and the records here are how a source and an adapter appear in provenance.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_cli.adapters.base import Adapter
from lora_cli.adapters.loading import load_adapter
from lora_cli.io.checkpoint import CheckpointIndex, open_checkpoint
from lora_cli.plan import MergePlan, build_plan
from lora_cli.resolve import ResolvedSource


@dataclass(frozen=True)
class AdapterSpec:
    """An adapter to apply and its weight (`ADAPTER@0.7` scales its delta by 0.7)."""

    source: ResolvedSource
    weight: float = 1.0
    allow_empty: bool = False  # `--allow-empty`: accept an adapter with no weights for its targets


def local_source(path: Path | str) -> ResolvedSource:
    """A local folder as a resolved source, for library callers that skip Hub resolution."""
    return ResolvedSource(ref=str(path), path=Path(path), revision=None, commit=None, is_local=True)


def source_record(source: ResolvedSource) -> dict[str, object]:
    return {"ref": source.ref, "revision": source.revision, "commit": source.commit}


def load_adapters(specs: list[AdapterSpec]) -> list[Adapter]:
    adapters = []
    for spec in specs:
        source = spec.source
        adapter = load_adapter(source.path, ref=source.ref, weight=spec.weight, allow_empty=spec.allow_empty)
        adapter.revision, adapter.commit = source.revision, source.commit
        adapters.append(adapter)
    return adapters


def adapter_record(adapter: Adapter) -> dict[str, object]:
    return {
        "ref": adapter.ref,
        "revision": adapter.revision,
        "commit": adapter.commit,
        "weight": adapter.weight,
        "peft_type": adapter.peft_type,
        "config": adapter.config,
    }


@dataclass
class Prepared:
    """A checkpoint opened, its adapters loaded, and the plan that lands them on it."""

    source: ResolvedSource
    specs: list[AdapterSpec]
    index: CheckpointIndex
    adapters: list[Adapter]
    plan: MergePlan

    @property
    def input_paths(self) -> list[Path]:
        """Every folder read: the output must not be one of them (nor lie inside one)."""
        return [self.source.path, *(spec.source.path for spec in self.specs)]

    def record(self, checkpoint_role: str = "base") -> dict[str, object]:
        """How the inputs appear in `loractl.json`."""
        return {checkpoint_role: source_record(self.source), "adapters": [adapter_record(a) for a in self.adapters]}


def prepare(
    checkpoint: ResolvedSource, adapters: list[AdapterSpec], dtype: str | None = None, **plan_options: Any
) -> Prepared:
    """Open `checkpoint`, load `adapters` in order, and plan them onto it.

    `dtype` None keeps `build_plan`'s default; `plan_options` go to `build_plan` as they are.
    """
    index = open_checkpoint(checkpoint.path)
    loaded = load_adapters(adapters)
    if dtype is not None:
        plan_options["dtype"] = dtype
    return Prepared(checkpoint, adapters, index, loaded, build_plan(index, loaded, **plan_options))
