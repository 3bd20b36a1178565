"""Helpers every command of the CLI shares: sizes, dtypes, adapter arguments, and the summary of a write.

Command modules import from here (and `_options`, `_output`, `_errors`), never from each other.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table

from lora_cli.cli._hub import push_rows
from lora_cli.cli._options import DTYPE_ALIASES, DTYPE_CHOICES
from lora_cli.cli._output import Output, human_bytes
from lora_cli.errors import InputError

if TYPE_CHECKING:  # the library (and torch) is imported by the commands that run, not by --help
    from lora_cli.combine import CombineOptions
    from lora_cli.engine import WriteSummary
    from lora_cli.sources import AdapterSpec

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
    """The long name of an output dtype: bf16, fp16 and fp32 are accepted beside bfloat16, float16, float32."""
    name = DTYPE_ALIASES.get(dtype.lower(), dtype.lower())
    if name not in DTYPE_CHOICES:
        names = ", ".join(f"{long} ({short})" for short, long in DTYPE_ALIASES.items())
        raise InputError(f"--dtype {dtype!r} is not a dtype loractl writes", fix=f"use auto, {names}")
    return name


def resolve_adapters(args: list[str], revision: str | None, allow_empty: bool = False) -> list[AdapterSpec]:
    from lora_cli.adapters.loading import parse_adapter_arg
    from lora_cli.resolve import resolve
    from lora_cli.sources import AdapterSpec

    specs = []
    for arg in args:
        ref, weight = parse_adapter_arg(arg)
        name, at, text = arg.rpartition("@")
        if at and name and weight == 1.0 and ref == arg and not Path(arg).expanduser().exists():
            # Hub repo ids cannot hold '@', so "lora@half" is a weight that is not a number, not a name.
            raise InputError(
                f"the weight after '@' ({text!r}) is not a number", path=arg, fix=f"write it like {name}@0.5"
            )
        specs.append(AdapterSpec(resolve(ref, role="adapter", revision=revision), weight, allow_empty))
    return specs


def render_summary(
    output: Output, summary: WriteSummary, title: str, *, as_json: bool = True, show_output: bool = True
) -> None:
    """Warnings and a summary table for people; the summary as JSON for machines (unless the caller prints its own)."""

    if as_json:
        output.json(summary)
    for warning in summary.warnings:
        output.warn(warning)
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    rows = [("output", summary.output)] if show_output else []
    rows += [
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
    push_rows(table, summary.push)
    output.table(table)


def combine_options(method: str, density: float, majority_sign: str, seed: int, no_normalize: bool) -> CombineOptions:
    """`--combine` and its knobs as `merge` and `diff --adapter` take them."""
    from lora_cli.combine import CombineOptions

    normalize = False if no_normalize else None  # None: each method's own default
    return CombineOptions(method=method, density=density, majority_sign=majority_sign, seed=seed, normalize=normalize)
