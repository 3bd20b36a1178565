"""`loractl resize ADAPTER OUT_ADAPTER`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from lora_cli.cli._errors import user_errors
from lora_cli.cli._options import DebugOpt, JsonOpt, OverwriteOpt, QuietOpt
from lora_cli.cli._output import Output

RESIZE_EXAMPLES = """
Examples:

  loractl resize ./lora-r64 ./lora-r16 --rank 16

  loractl resize ./lora ./lora-small --energy 0.95              (per-module rank, in rank_pattern)

  loractl resize ./loha ./lora --rank 32                        (LoHa/LoKr in, LoRA out)
"""


def resize_command(
    adapter: Annotated[Path, typer.Argument(help="A LoRA, LoHa or LoKr adapter folder.", show_default=False)],
    out: Annotated[Path, typer.Argument(help="Folder for the resized LoRA adapter.", show_default=False)],
    rank: Annotated[int | None, typer.Option("--rank", "-r", help="Rank of every module.")] = None,
    energy: Annotated[
        float | None,
        typer.Option("--energy", help="Per module, the least rank keeping this share of sum(s^2), e.g. 0.95."),
    ] = None,
    max_rank: Annotated[
        int | None, typer.Option("--max-rank", help="Cap on any module's rank (with --energy).")
    ] = None,
    dtype: Annotated[
        str, typer.Option("--dtype", help="dtype of the written factors: float32, bfloat16 or float16.")
    ] = "float32",
    overwrite: OverwriteOpt = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Shrink (or re-balance) an adapter's rank: the best rank-R approximation of each module's delta.

    For LoRA the SVD of scale * B @ A comes from QR of the factors and an r x r SVD, in fp64, never forming the
    full matrix. LoHa and LoKr deltas are formed and truncated, converting the adapter to LoRA. The new modules
    have lora_alpha = r; biases and modules_to_save are carried over. Reports per module the share of the
    delta's energy (sum of s^2) kept. OUT appears whole or not at all.
    """
    # The library (torch) is imported here, not at start-up: --help stays instant.
    from lora_cli.lowrank import Truncation
    from lora_cli.resize import ResizeOptions, resize

    output = Output(json_mode=json_output, quiet=quiet)
    with user_errors(debug):
        options = ResizeOptions(
            truncation=Truncation(rank=rank, energy=energy, max_rank=max_rank),
            dtype=dtype.lower(),
            overwrite=overwrite,
        )
        summary = resize(adapter, out, options)
    output.json(summary)
    table = Table(title=f"resize ({summary.source_type} -> LORA)", title_justify="left")
    for column in ("module", "rank", "energy kept"):
        table.add_column(column, justify="left" if column == "module" else "right")
    for m in summary.modules:
        before = "" if m.old_rank is None else f"{m.old_rank} -> "
        table.add_row(m.module, f"{before}{m.rank}", f"{m.energy_kept:.4f}")
    output.table(table)
    output.line(
        f"{len(summary.modules)} modules, energy kept {summary.energy_kept:.4f}, "
        f"{len(summary.carried)} tensors carried over, {summary.seconds:.2f} s -> {summary.output}"
    )
