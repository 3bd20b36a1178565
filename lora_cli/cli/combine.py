"""`loractl combine ADAPTER@W [ADAPTER@W ...] OUT_ADAPTER`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from lora_cli.cli._errors import user_errors
from lora_cli.cli._options import DebugOpt, JsonOpt, OverwriteOpt, QuietOpt
from lora_cli.cli._output import Output
from lora_cli.errors import InputError

COMBINE_EXAMPLES = """
Examples:

  loractl combine ./a@0.7 ./b@0.3 ./ab                                  (cat: exact, rank = sum of ranks)

  loractl combine ./a ./b ./ab --method ties --density 0.5 --rank 16

  loractl combine ./a ./b ./ab --method dare_linear --density 0.3 --seed 7 --energy 0.95

  loractl combine ./a@1 ./b@1 ./ab --peft-compatible --method ties_svd --density 0.5 --rank 8
"""


def combine_command(
    adapters_and_out: Annotated[
        list[str],
        typer.Argument(
            help="Two or more adapter folders (each optionally ADAPTER@WEIGHT), then the OUT folder.",
            show_default=False,
            metavar="ADAPTER... OUT",
        ),
    ],
    method: Annotated[
        str,
        typer.Option(
            "--method",
            help="One of cat, sum, ties, dare_linear, dare_ties, magnitude_prune (see loractl merge --help).",
        ),
    ] = "cat",
    density: Annotated[
        float | None, typer.Option("--density", help="Share of each delta kept (ties, dare_*, ...; default 1).")
    ] = None,
    majority_sign: Annotated[
        str, typer.Option("--majority-sign", help="TIES sign election: total or frequency.")
    ] = "total",
    seed: Annotated[
        int,
        typer.Option("--seed", help="Seed of DARE's masks (with each adapter's position and the module's name)."),
    ] = 0,
    no_normalize: Annotated[bool, typer.Option("--no-normalize", help="ties: do not divide by the weights.")] = False,
    rank: Annotated[
        int | None, typer.Option("--rank", "-r", help="Rank of every combined module (default: the largest input).")
    ] = None,
    energy: Annotated[
        float | None, typer.Option("--energy", help="Per module, the least rank keeping this share of sum(s^2).")
    ] = None,
    max_rank: Annotated[
        int | None, typer.Option("--max-rank", help="Cap on any module's rank (with --energy).")
    ] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="dtype of the written factors.")] = "float32",
    peft_compatible: Annotated[
        bool,
        typer.Option(
            "--peft-compatible",
            help="Follow PEFT's add_weighted_adapter exactly (--method linear, cat, svd, ties, ties_svd, "
            "dare_linear, dare_ties, dare_linear_svd, dare_ties_svd, magnitude_prune, magnitude_prune_svd; --rank "
            "is svd_rank), quirks included: see README. Its DARE masks match PEFT's only in distribution.",
        ),
    ] = False,
    overwrite: OverwriteOpt = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Combine LoRA adapters into one PEFT LoRA adapter (loadable by PeftModel.from_pretrained and vLLM).

    cat stacks the factors (exact; the rank is the sum of the inputs'). Every other method combines each module's
    fp32 deltas as `merge --combine` does (the same DARE masks) and truncates the result by SVD to --rank (default
    the largest input rank) or --energy, with rank_pattern where modules differ; it reports per module the share of
    the combined delta's energy kept. OUT appears whole or not at all.
    """
    # The library (torch) is imported here, not at start-up: --help stays instant.
    from lora_cli.adapters.loading import parse_adapter_arg
    from lora_cli.combine_adapters import CombineAdaptersOptions, combine_adapters
    from lora_cli.lowrank import Truncation

    output = Output(json_mode=json_output, quiet=quiet)
    with user_errors(debug):
        if len(adapters_and_out) < 2:
            raise InputError("combine needs at least one ADAPTER and OUT", fix="see loractl combine --help")
        *adapter_args, out = adapters_and_out
        parsed = [parse_adapter_arg(arg) for arg in adapter_args]
        if rank is not None and energy is not None:
            raise InputError("give at most one of --rank and --energy")
        if rank is not None and rank < 1:
            raise InputError(f"--rank {rank} must be at least 1")
        if energy is not None and not 0 < energy <= 1:
            raise InputError(f"--energy {energy} must be in (0, 1]")
        truncation = None
        if rank is not None or energy is not None:
            truncation = Truncation(rank=rank, energy=energy, max_rank=max_rank)
        options = CombineAdaptersOptions(
            method=method,
            density=density,
            majority_sign=majority_sign,
            seed=seed,
            normalize=False if no_normalize else None,
            truncation=truncation,
            dtype=dtype.lower(),
            overwrite=overwrite,
            peft_compatible=peft_compatible,
        )
        summary = combine_adapters([Path(ref) for ref, _ in parsed], [w for _, w in parsed], Path(out), options)
    output.json(summary)
    table = Table(title=f"combine ({summary.method})", title_justify="left")
    for column in ("module", "inputs", "rank", "energy kept"):
        table.add_column(column, justify="left" if column == "module" else "right")
    for m in summary.modules:
        kept = "exact" if m.energy_kept is None else f"{m.energy_kept:.4f}"
        table.add_row(m.module, str(m.inputs), str(m.rank), kept)
    output.table(table)
    overall = "exact" if summary.energy_kept is None else f"energy kept {summary.energy_kept:.4f}"
    output.line(f"{len(summary.modules)} modules, {overall}, {summary.seconds:.2f} s -> {summary.output}")
