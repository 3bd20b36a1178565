"""`loractl merge`: add one or more adapters to a base checkpoint, streaming, into a new checkpoint."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lora_cli.engine import Progress, WriteOptions, WriteSummary, write_merge
from lora_cli.plan import MergePlan
from lora_cli.resolve import ResolvedSource
from lora_cli.sources import AdapterSpec, prepare


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
    prepared = prepare(base, adapters, dtype=options.dtype)
    if on_plan is not None:
        on_plan(prepared.plan)
    return write_merge(prepared, out, options, progress)
