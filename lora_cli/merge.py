"""`loractl merge`: add one or more adapters to a base checkpoint, streaming, into a new checkpoint."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

from lora_cli.adapters.lineage import base_names
from lora_cli.combine import CombineOptions
from lora_cli.combined_merge import combine_transform
from lora_cli.engine import Progress, WriteOptions, WriteSummary, apply_edits, write_merge, write_plan
from lora_cli.errors import InputError
from lora_cli.peft_weighted import PeftCombine, write_peft_weighted_adapter
from lora_cli.plan import MergePlan
from lora_cli.quant.lineage import quantization_warnings
from lora_cli.quant.requantize import requantize_plan
from lora_cli.resolve import ResolvedSource
from lora_cli.sources import AdapterSpec, local_source, prepare, source_record


def merge(
    base: ResolvedSource,
    adapters: list[AdapterSpec],
    out: Path,
    options: WriteOptions | None = None,
    progress: Progress | None = None,
    on_plan: Callable[[MergePlan], None] | None = None,
    combine: CombineOptions | None = None,
    peft: PeftCombine | None = None,
    requantize: bool = False,
) -> WriteSummary:
    """Merge `adapters` into `base` in order (one pass), writing a standalone checkpoint to `out`.

    `combine` (other than plain `sum`) combines the adapters' deltas per tensor instead (TIES, DARE, ...): the
    adapters are loaded at weight 1 and their weights go to the combination. A quantized base is written
    dequantized, or in its own format with `requantize` (lora_cli/quant/)."""
    options = options or WriteOptions()
    combining = combine is not None and (combine.method != "sum" or combine.normalized)
    if requantize and (combining or peft is not None):
        raise InputError(
            "--requantize does not combine with --combine or --peft-compatible",
            fix="merge with the combination first, without --requantize",
        )
    if peft is not None:
        return _merge_as_peft(base, adapters, Path(out), options, progress, on_plan, peft)
    specs = [replace(spec, weight=1.0) for spec in adapters] if combining else adapters
    prepared = prepare(base, specs, dtype=options.dtype)
    names = base_names(base.ref, base.path, prepared.index.config())
    prepared.plan.warnings.extend(quantization_warnings(prepared.index.quantization, prepared.adapters, names))
    transform = apply_edits
    if requantize:
        prepared.plan, transform = requantize_plan(prepared.plan)
    if on_plan is not None:
        on_plan(prepared.plan)
    if not combining:
        return write_merge(prepared, out, options, progress, transform)
    assert combine is not None
    weights = [spec.weight for spec in adapters]
    record = prepared.record()
    for entry, weight in zip(record["adapters"], weights, strict=True):  # type: ignore[call-overload]
        entry["weight"] = weight
    record["combine"] = asdict(combine)
    return write_plan(
        prepared.plan,
        out,
        combine_transform(prepared.adapters, weights, combine),
        options,
        operation="merge",
        record=record,
        inputs=prepared.input_paths,
        progress=progress,
    )


def _merge_as_peft(
    base: ResolvedSource,
    adapters: list[AdapterSpec],
    out: Path,
    options: WriteOptions,
    progress: Progress | None,
    on_plan: Callable[[MergePlan], None] | None,
    peft: PeftCombine,
) -> WriteSummary:
    """`--peft-compatible`: what PEFT's add_weighted_adapter then merge_and_unload gives. The combined adapter is
    written to a hidden folder beside OUT (PEFT's tensors, lora_cli.peft_weighted) and merged like any adapter."""
    parent = out.expanduser().resolve().parent
    with tempfile.TemporaryDirectory(prefix=".loractl-peft-", dir=parent) as tmp:
        combined = Path(tmp) / "combined"
        written = write_peft_weighted_adapter(
            [spec.source.path for spec in adapters], [spec.weight for spec in adapters], combined, peft
        )
        prepared = prepare(base, [AdapterSpec(local_source(combined))], dtype=options.dtype)
        if on_plan is not None:
            on_plan(prepared.plan)
        record = prepared.record()
        record["adapters"] = [{**source_record(spec.source), "weight": spec.weight} for spec in adapters]
        record["peft_combination"] = {**asdict(peft), "ran": written.kind, "config": written.config}
        return write_plan(
            prepared.plan,
            out,
            apply_edits,
            options,
            operation="merge",
            record=record,
            inputs=[base.path, *(spec.source.path for spec in adapters)],
            progress=progress,
        )
