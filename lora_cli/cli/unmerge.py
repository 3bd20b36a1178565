"""`loractl unmerge MERGED ADAPTER [ADAPTER ...] OUT`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from lora_cli.cli._common import check_dtype, parse_size, render_summary, resolve_adapters
from lora_cli.cli._errors import user_errors
from lora_cli.cli._hub import (
    BranchOpt,
    CommitMessageOpt,
    CreatePrOpt,
    DownloadOpt,
    KeepLocalOpt,
    OutOpt,
    PrivateOpt,
    PushArgs,
    PushOpt,
    command_line,
    local_out,
    outputs,
)
from lora_cli.cli._options import (
    AdapterRevisionOpt,
    AllowEmptyOpt,
    DebugOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    MaxShardOpt,
    OverwriteOpt,
    QuietOpt,
    VerifyOpt,
    requantize_option,
    revision_option,
)
from lora_cli.cli._output import Output
from lora_cli.errors import SwappedArgumentsError

if TYPE_CHECKING:
    from lora_cli.unmerge import UnmergeSummary

UNMERGE_EXAMPLES = """
Examples:

  loractl unmerge ./merged ./my-lora ./base-again

  loractl unmerge ./merged ./sft-lora ./rl-lora ./base-again     (same order as the merge; undone in reverse)

  loractl unmerge ./merged ./lora-with-modules-to-save ./out --base ./base

  loractl unmerge ./merged ./my-lora ./out --check-against ./base --json

  loractl unmerge ./merged-fp8 ./lora ./base-fp8 --requantize   (a quantized MERGED in its own format, new scales)
"""


UNMERGE_SWAP_FIX = "pass the merged checkpoint first, then the adapters, then OUT"


def render_unmerge(output: Output, summary: UnmergeSummary) -> None:
    from rich.table import Table

    render_summary(output, summary, "unmerge")
    output.line(f"expected error: {summary.expected_error}")
    if summary.base_used_for:
        output.line(f"taken from --base: {', '.join(summary.base_used_for)}")
    if summary.retied:
        output.line(f"re-tied: dropped {', '.join(summary.retied)}, tie_word_embeddings is true again")
    if summary.check_against is None:
        return
    table = Table(title=f"error against {summary.check_against}", title_justify="left")
    for column in ("tensor", "dtype", "max ulps", "bit-exact", "max |error|"):
        table.add_column(column, justify="left" if column in ("tensor", "dtype") else "right", overflow="fold")
    for check in summary.checks:
        table.add_row(
            check.name, check.dtype, f"{check.max_ulps:.3g}", f"{check.exact_share:.1%}", f"{check.max_abs:.3g}"
        )
    output.table(table)
    output.line(
        f"max error {summary.check_max_ulps:.3g} ulps (at the larger magnitude of W and the merged value), "
        f"{summary.check_exact_share:.1%} of reverted elements bit-exact"
    )


def unmerge_command(
    merged: Annotated[
        str, typer.Argument(help="Merged checkpoint: a local folder or a Hub repo id.", show_default=False)
    ],
    adapters_and_out: Annotated[
        list[str],
        typer.Argument(
            help="The adapters that were merged, in merge order (each optionally ADAPTER@WEIGHT), then OUT.",
            show_default=False,
            metavar="ADAPTER... OUT",
        ),
    ],
    base: Annotated[
        str | None,
        typer.Option(
            "--base",
            help="The original base: supplies what the merged file lost (modules_to_save, trainable tokens, DoRA).",
        ),
    ] = None,
    check_against: Annotated[
        str | None,
        typer.Option("--check-against", help="Measure the error of every reverted tensor against this checkpoint."),
    ] = None,
    revision: Annotated[str | None, revision_option("MERGED")] = None,
    adapter_revision: AdapterRevisionOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    max_shard_size: MaxShardOpt = None,
    overwrite: OverwriteOpt = False,
    verify: VerifyOpt = False,
    out_option: OutOpt = None,
    push_to_hub: PushOpt = None,
    private: PrivateOpt = False,
    branch: BranchOpt = None,
    commit_message: CommitMessageOpt = None,
    create_pr: CreatePrOpt = False,
    keep_local: KeepLocalOpt = False,
    download: DownloadOpt = False,
    allow_empty: AllowEmptyOpt = False,
    requantize: Annotated[bool, requantize_option("MERGED", "reverted")] = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Take adapters back out of a merged checkpoint: W = merged - delta, streamed and written atomically.

    Give the adapters in the order they were merged; they are undone in reverse. What the merged file alone cannot
    give back (modules_to_save, trainable tokens, DoRA) is refused unless --base supplies the originals. MERGED's
    dtypes are kept unless --dtype is given. bf16/fp16 round trips are not exact: expect about 1 ulp per element
    at the larger magnitude of W and the merged value; --check-against BASE measures it per tensor. A quantized
    MERGED is written dequantized, or in its own format with --requantize (FP8, bitsandbytes 4-bit).
    """
    from lora_cli.engine import WriteOptions
    from lora_cli.resolve import resolve
    from lora_cli.unmerge import unmerge

    output = Output(json_mode=json_output, quiet=quiet)
    push = PushArgs(push_to_hub, private, branch, commit_message, create_pr, keep_local)
    with (
        user_errors(debug, json_output=json_output, out=local_out(adapters_and_out, out_option, push)),
        outputs("unmerge", adapters_and_out, out_option, push, overwrite=overwrite) as found,
    ):
        adapter_args, out, publisher = found
        options = WriteOptions(
            device=device,
            dtype=check_dtype(dtype),
            max_shard_bytes=parse_size(max_shard_size),
            overwrite=overwrite,
            verify=verify,
            publish=publisher,
            command=command_line(),
        )
        merged_source = resolve(merged, role="checkpoint", revision=revision, stream=not download)
        specs = resolve_adapters(adapter_args, adapter_revision, allow_empty)
        base_source = resolve(base, role="base") if base else None
        reference = resolve(check_against, role="checkpoint") if check_against else None
        with output.progress("unmerging") as bar:
            try:
                summary = unmerge(
                    merged_source,
                    specs,
                    Path(out),
                    options,
                    base=base_source,
                    check_against=reference,
                    progress=bar,
                    on_plan=lambda p: bar.set_total(p.output_bytes),
                    requantize=requantize,
                )
            except SwappedArgumentsError as exc:
                if exc.path != str(merged_source.path):
                    raise
                raise SwappedArgumentsError(exc.message, path=exc.path, fix=UNMERGE_SWAP_FIX) from None
    if publisher is not None and out_option is None:
        summary.output = f"{push_to_hub} (no local copy)"
    render_unmerge(output, summary)
