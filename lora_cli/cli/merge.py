"""`loractl merge BASE ADAPTER [ADAPTER ...] OUT`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from lora_cli.adapters.lineage import source_lineage
from lora_cli.adapters.loading import parse_adapter_arg
from lora_cli.cli._errors import user_errors
from lora_cli.cli._options import (
    DTYPE_CHOICES,
    AdapterRevisionOpt,
    DebugOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    MaxShardOpt,
    OverwriteOpt,
    QuietOpt,
    RevisionOpt,
    VerifyOpt,
)
from lora_cli.cli._output import Output, human_bytes
from lora_cli.engine import WriteOptions, WriteSummary
from lora_cli.errors import AdapterMismatchError, InputError
from lora_cli.merge import AdapterSpec, merge
from lora_cli.resolve import resolve

MERGE_EXAMPLES = """
Examples:

  loractl merge meta-llama/Llama-3.2-1B ./my-lora ./merged

  loractl merge ./base ./sft-lora ./rl-lora ./merged        (stacked, applied in order)

  loractl merge ./base ./a@0.7 ./b@0.3 ./merged            (weighted sum of deltas)

  loractl merge ./base ./lora ./merged --dtype float32 --max-shard-size 2GB --json
"""

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(text: str | None) -> int | None:
    """'5GB' -> 5e9, '500MiB' -> 500 * 2**20; decimal units as transformers' max_shard_size reads them."""
    if text is None:
        return None
    match = _SIZE.match(text)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise InputError(f"--max-shard-size {text!r} is not a size", fix="write it like 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * _UNITS[unit])


def check_dtype(dtype: str) -> str:
    dtype = dtype.lower()
    if dtype not in DTYPE_CHOICES:
        raise InputError(f"--dtype {dtype!r} is not one of {', '.join(DTYPE_CHOICES)}")
    return dtype


def resolve_adapters(args: list[str], revision: str | None) -> list[AdapterSpec]:
    specs = []
    for arg in args:
        ref, weight = parse_adapter_arg(arg)
        specs.append(AdapterSpec(resolve(ref, role="adapter", revision=revision), weight))
    return specs


def render_summary(output: Output, summary: WriteSummary, title: str, *, as_json: bool = True) -> None:
    """Warnings and a summary table for people; the summary as JSON for machines (unless the caller prints its own)."""
    if as_json:
        output.json(summary)
    for warning in summary.warnings:
        output.warn(warning)
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("output", summary.output),
        ("tensors edited", f"{summary.tensors_edited} of {summary.tensors_total}"),
        ("tensors copied as bytes", str(summary.tensors_copied)),
        ("written", f"{human_bytes(summary.bytes_written)} in {len(summary.files)} file(s)"),
        ("time", f"{summary.seconds:.2f} s ({summary.gb_per_s:.2f} GB/s)"),
        ("peak memory (anonymous)", human_bytes(summary.peak_rss_anon_bytes)),
        ("peak memory (file-backed)", human_bytes(summary.peak_rss_file_bytes)),
        ("device / dtype", f"{summary.device} / {summary.dtype}"),
    ]
    if summary.peak_gpu_bytes is not None:
        rows.append(("peak GPU memory", human_bytes(summary.peak_gpu_bytes)))
    for key, value in summary.config_changes.items():
        rows.append((f"config: {key}", str(value)))
    if summary.verification is not None:
        check = summary.verification
        rows.append(("verified", f"{check.tensors} tensors, {check.files} files ({check.seconds:.2f} s)"))
        rows.append(("manifest", f"{check.manifest} (sha256sum -c {check.manifest})"))
    for row in rows:
        table.add_row(*row)
    output.table(table)


def merge_command(
    base: Annotated[str, typer.Argument(help="Base model: a local folder or a Hub repo id.", show_default=False)],
    adapters_and_out: Annotated[
        list[str],
        typer.Argument(
            help="One or more adapters (folders or Hub ids, each optionally ADAPTER@WEIGHT), then the OUT folder.",
            show_default=False,
            metavar="ADAPTER... OUT",
        ),
    ],
    revision: RevisionOpt = None,
    adapter_revision: AdapterRevisionOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    max_shard_size: MaxShardOpt = None,
    overwrite: OverwriteOpt = False,
    no_safe_merge: Annotated[
        bool, typer.Option("--no-safe-merge", help="Skip the NaN/Inf check of every merged tensor.")
    ] = False,
    strict: Annotated[
        bool,
        typer.Option("--strict", help="Refuse an adapter whose base_model_name_or_path names another model."),
    ] = False,
    verify: VerifyOpt = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Merge adapters into a base model and write a standalone checkpoint that transformers loads without PEFT.

    Streams the base tensor by tensor: untouched tensors are copied as bytes, adapted ones are computed in fp32
    and rounded once, so memory stays flat and the result matches PEFT's merge_and_unload. Several adapters are
    applied in order in one pass; ADAPTER@W scales that adapter's delta by W (for LoRA, what PEFT's
    add_weighted_adapter with combination_type="cat" gives). OUT appears whole or not at all.
    """
    output = Output(json_mode=json_output, quiet=quiet)
    with user_errors(debug):
        if len(adapters_and_out) < 2:
            raise InputError("merge needs BASE, at least one ADAPTER, and OUT", fix="see loractl merge --help")
        *adapter_args, out = adapters_and_out
        options = WriteOptions(
            device=device,
            dtype=check_dtype(dtype),
            max_shard_bytes=parse_size(max_shard_size),
            overwrite=overwrite,
            check_finite=not no_safe_merge,
            verify=verify,
        )
        base_source = resolve(base, role="base", revision=revision)
        specs = resolve_adapters(adapter_args, adapter_revision)
        lineage = source_lineage(base_source, [spec.source for spec in specs])
        if strict and lineage:
            raise AdapterMismatchError(lineage[0], fix="check the adapters and the base, or drop --strict")
        with output.progress("merging") as bar:
            summary = merge(
                base_source, specs, Path(out), options, progress=bar, on_plan=lambda p: bar.set_total(p.output_bytes)
            )
        summary.warnings[:0] = lineage
        render_summary(output, summary, "merge")
