"""`loractl merge BASE ADAPTER [ADAPTER ...] OUT`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lora_cli.cli._common import check_dtype, parse_size, render_summary, resolve_adapters
from lora_cli.cli._errors import user_errors
from lora_cli.cli._options import (
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
from lora_cli.cli._output import Output
from lora_cli.errors import AdapterMismatchError, InputError

MERGE_EXAMPLES = """
Examples:

  loractl merge meta-llama/Llama-3.2-1B ./my-lora ./merged

  loractl merge ./base ./sft-lora ./rl-lora ./merged        (stacked, applied in order)

  loractl merge ./base ./a@0.7 ./b@0.3 ./merged            (weighted sum of deltas)

  loractl merge ./base ./lora ./merged --dtype bf16 --max-shard-size 2GB --json
"""


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
    # The library (torch, transformers) is imported here, not at start-up: --help stays instant, and an
    # interruption during these imports exits 130 at once (cli/_signals.py).
    from lora_cli.adapters.lineage import source_lineage
    from lora_cli.engine import WriteOptions
    from lora_cli.merge import merge
    from lora_cli.resolve import resolve

    output = Output(json_mode=json_output, quiet=quiet)
    out = adapters_and_out[-1]
    with user_errors(debug, json_output=json_output, out=out):
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
