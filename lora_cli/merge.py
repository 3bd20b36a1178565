"""`loractl merge`: add one or more adapters to a base checkpoint, streaming, into a new checkpoint."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lora_cli.adapters.base import Adapter
from lora_cli.adapters.loading import load_adapter
from lora_cli.engine import Progress, WriteOptions, WriteSummary, apply_edits, write_plan
from lora_cli.io.checkpoint import open_checkpoint
from lora_cli.plan import MergePlan, build_plan
from lora_cli.resolve import ResolvedSource


@dataclass(frozen=True)
class AdapterSpec:
    """An adapter to apply and its weight (`ADAPTER@0.7` scales its delta by 0.7)."""

    source: ResolvedSource
    weight: float = 1.0


def local_source(path: Path | str) -> ResolvedSource:
    """A local folder as a resolved source, for library callers that skip Hub resolution."""
    return ResolvedSource(ref=str(path), path=Path(path), revision=None, commit=None, is_local=True)


def source_record(source: ResolvedSource) -> dict[str, object]:
    return {"ref": source.ref, "revision": source.revision, "commit": source.commit}


def load_adapters(specs: list[AdapterSpec]) -> list[Adapter]:
    adapters = []
    for spec in specs:
        source = spec.source
        adapter = load_adapter(source.path, ref=source.ref, weight=spec.weight)
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


def merge(
    base: ResolvedSource,
    adapters: list[AdapterSpec],
    out: Path,
    options: WriteOptions | None = None,
    progress: Progress | None = None,
    on_plan: Callable[[MergePlan], None] | None = None,
) -> WriteSummary:
    """Merge `adapters` into `base` in order (one pass), writing a standalone checkpoint to `out`."""
    options = options or WriteOptions()
    index = open_checkpoint(base.path)
    loaded = load_adapters(adapters)
    plan = build_plan(index, loaded, dtype=options.dtype)
    if on_plan is not None:
        on_plan(plan)
    record = {"base": source_record(base), "adapters": [adapter_record(a) for a in loaded]}
    return write_plan(
        plan,
        out,
        apply_edits,
        options,
        operation="merge",
        record=record,
        inputs=[base.path, *(a.source.path for a in adapters)],
        progress=progress,
    )
