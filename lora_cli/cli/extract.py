"""`loractl extract BASE TUNED OUT_ADAPTER`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from lora_cli.cli._errors import user_errors
from lora_cli.cli._options import DebugOpt, DeviceOpt, JsonOpt, OverwriteOpt, QuietOpt, RevisionOpt
from lora_cli.cli._output import Output, human_bytes

if TYPE_CHECKING:
    from lora_cli.extract import ExtractSummary

EXTRACT_EXAMPLES = """
Examples:

  loractl extract ./base ./finetuned ./lora --rank 32

  loractl extract ./base ./finetuned ./lora --energy 0.9 --max-rank 128      (per-module rank)

  loractl extract ./base ./finetuned ./lora --rank 16 --include 'self_attn' --exclude 'layers\\.0\\.'

  loractl extract ./base ./finetuned ./lora --rank 64 --device cuda --json
"""


def render_extract(output: Output, summary: ExtractSummary) -> None:
    output.json(summary)
    for warning in summary.warnings:
        output.warn(warning)
    table = Table(title="modules", title_justify="left")
    for column in ("tensor", "as", "shape", "rank", "energy kept", "rel. error"):
        table.add_column(column, justify="left" if column in ("tensor", "as") else "right")
    for m in summary.modules:
        table.add_row(
            m.tensor,
            m.role,
            "x".join(map(str, m.shape)),
            "-" if m.rank is None else str(m.rank),
            "-" if m.energy_kept is None else f"{m.energy_kept:.4f}",
            "-" if m.relative_error is None else f"{m.relative_error:.2e}",
        )
    output.table(table)
    ranks = [m.rank for m in summary.modules if m.rank is not None]
    overall = Table(title="extract", show_header=False, title_justify="left")
    overall.add_column(style="bold")
    overall.add_column()
    rows = [
        ("output", summary.output),
        ("LoRA modules", f"{len(ranks)} (rank {min(ranks)}-{max(ranks)})" if ranks else "0"),
        ("modules_to_save", ", ".join(summary.config.get("modules_to_save") or []) or "-"),
        ("unchanged / excluded", f"{summary.tensors_unchanged} / {summary.tensors_excluded}"),
        ("tensors", str(summary.tensors_total)),
        ("energy kept", f"{summary.energy_kept:.4f}"),
        ("relative error", f"{summary.relative_error:.3e}"),
        ("time", f"{summary.seconds:.2f} s"),
        ("peak memory (anonymous)", human_bytes(summary.peak_rss_anon_bytes)),
        ("device", summary.device),
    ]
    if summary.peak_gpu_bytes is not None:
        rows.append(("peak GPU memory", human_bytes(summary.peak_gpu_bytes)))
    for row in rows:
        overall.add_row(*row)
    output.table(overall)


def extract_command(
    base: Annotated[str, typer.Argument(help="Base model: a local folder or a Hub repo id.", show_default=False)],
    tuned: Annotated[str, typer.Argument(help="The fully fine-tuned model (same architecture).", show_default=False)],
    out: Annotated[Path, typer.Argument(help="Folder to write the PEFT LoRA adapter to.", show_default=False)],
    rank: Annotated[int | None, typer.Option("--rank", "-r", help="Rank of every module.")] = None,
    energy: Annotated[
        float | None,
        typer.Option("--energy", help="Per module, the least rank keeping this share of sum(s^2), e.g. 0.9."),
    ] = None,
    max_rank: Annotated[int | None, typer.Option("--max-rank", help="Cap on any module's rank.")] = None,
    include: Annotated[
        list[str] | None, typer.Option("--include", help="Only modules whose path matches this regex (repeatable).")
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option("--exclude", help="Skip modules whose path matches this regex (repeatable).")
    ] = None,
    dtype: Annotated[
        str, typer.Option("--dtype", help="dtype of the written factors: float32, bfloat16 or float16.")
    ] = "float32",
    revision: RevisionOpt = None,
    tuned_revision: Annotated[
        str | None, typer.Option("--tuned-revision", help="Branch, tag or commit of TUNED when it is a Hub repo id.")
    ] = None,
    device: DeviceOpt = "auto",
    overwrite: OverwriteOpt = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Extract a LoRA adapter from a fully fine-tuned model: a truncated SVD of each changed weight's delta.

    Streams BASE and TUNED tensor pair by tensor pair (memory holds a pair or two, whatever the model's size).
    Each changed linear weight becomes lora_A/lora_B at --rank, or at the least rank keeping --energy of the
    delta (rank_pattern/alpha_pattern in adapter_config.json then record the ranks), with lora_alpha = r. The SVD
    is exact on small matrices and randomized (seeded per tensor: the same result on every run) on large ones.
    Changed embeddings, output heads and norms are saved whole in modules_to_save; a resized vocabulary too.
    Reports per module the rank, the share of the delta's energy kept and the relative error of the
    reconstruction. OUT appears whole or not at all.
    """
    # The library (torch) is imported here, not at start-up: --help stays instant.
    from lora_cli.extract import ExtractOptions, extract
    from lora_cli.lowrank import Truncation
    from lora_cli.resolve import resolve

    output = Output(json_mode=json_output, quiet=quiet)
    with user_errors(debug):
        options = ExtractOptions(
            truncation=Truncation(rank=rank, energy=energy, max_rank=max_rank),
            include=tuple(include or ()),
            exclude=tuple(exclude or ()),
            device=device,
            dtype=dtype.lower(),
            overwrite=overwrite,
        )
        base_source = resolve(base, role="base", revision=revision)
        tuned_source = resolve(tuned, role="base", revision=tuned_revision)
        with output.progress("extracting") as bar:
            summary = extract(
                base_source.path,
                tuned_source.path,
                out,
                options,
                base_ref=base_source.ref,
                progress=bar,
                on_total=bar.set_total,
            )
        render_extract(output, summary)
