"""`loractl inspect ADAPTER [--base BASE]`: what an adapter or checkpoint holds."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from lora_cli.cli._errors import user_errors
from lora_cli.cli._options import AllowEmptyOpt, DebugOpt, JsonOpt, QuietOpt, revision_option
from lora_cli.cli._output import Output, human_bytes
from lora_cli.errors import InputError

if TYPE_CHECKING:
    from lora_cli.inspect import AdapterReport, CheckpointReport
    from lora_cli.resolve import ResolvedSource

INSPECT_EXAMPLES = """
Examples:

  loractl inspect ./my-lora

  loractl inspect ./my-lora --base meta-llama/Llama-3.2-1B     (does it fit? PEFT's trainable share, |delta|/|W|)

  loractl inspect someone/their-lora --json

  loractl inspect ./merged                                      (a checkpoint: dtypes, shards, loractl provenance)
"""


def _resolve_either(ref: str, revision: str | None) -> ResolvedSource:
    """An adapter (folder or Hub id; tried first), or else a Hub model repo to describe as a checkpoint."""
    from lora_cli.resolve import resolve

    try:
        return resolve(ref, role="adapter", revision=revision)
    except InputError:
        if Path(ref).expanduser().exists():
            raise
        return resolve(ref, role="checkpoint", revision=revision)


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def render_adapter(output: Output, report: AdapterReport, wide: bool = False) -> None:
    from rich.table import Table

    from lora_cli.inspect import EFFECTIVE_RANK_HELP

    summary = Table(title=f"adapter {report.ref}", show_header=False, title_justify="left")
    summary.add_column(style="bold", no_wrap=True)
    summary.add_column(overflow="fold")  # a long regex of target_modules wraps instead of ending in "..."
    params = report.params
    rows = [
        ("type", f"{report.type_label} (peft_type {report.peft_type})"),
        ("saved by PEFT", report.peft_version or "unknown (no peft_version in the config)"),
        ("base model", str(report.base_model or "-")),
        ("task type", str(report.task_type or "-")),
        ("r / alpha", f"{report.r} / {report.alpha}"),
        ("rsLoRA / DoRA", f"{report.use_rslora} / {report.use_dora}"),
        ("target modules", str(report.target_modules)),
        ("modules_to_save", str(report.modules_to_save or "-")),
        ("adapted modules", str(report.num_modules)),
        ("parameters", f"{report.num_params:,d}"),
        ("  factors", f"{params.factors:,d}"),
        ("  magnitudes (DoRA)", f"{params.magnitudes:,d}"),
        ("  saved full modules", f"{params.full_modules:,d}"),
        ("  token rows", f"{params.token_rows:,d}"),
        ("  other", f"{params.other:,d}"),
        ("dtypes", ", ".join(f"{k} ({v:,d})" for k, v in report.dtypes.items())),
        ("size on disk", human_bytes(report.size_on_disk)),
    ]
    if report.fit is not None:
        rows.append(("fits base", f"yes: {report.fit.base} ({report.fit.tensors_edited} tensors edited)"))
        rows.append(("PEFT would print", report.fit.peft_line))
    for row in rows:
        summary.add_row(*row)
    output.table(summary)

    with_base = report.fit is not None
    for warning in report.fit.warnings if with_base else []:
        output.warn(warning)
    table = Table(title="modules", title_justify="left", caption=EFFECTIVE_RANK_HELP, caption_justify="left")
    # The default fits 80 columns: the columns that tell modules apart, the note under the tensor's name; --wide
    # adds shape, alpha, scale and the spectrum-based numbers, and the note as a column (all are in --json).
    columns = ["tensor", "kind", "rank", "|delta|_F"] + (["|delta|/|W|"] if with_base else [])
    if wide:
        columns[2:2] = ["delta shape"]
        columns[4:4] = ["alpha", "scale"]
        columns += ["eff. rank"] + (["amplification"] if with_base else []) + ["note"]
    for column in columns:
        justify = "left" if column in ("tensor", "kind", "note") else "right"
        # Names, kinds and notes wrap; numbers stay whole, and no column is narrower than its header.
        wraps = column in ("tensor", "kind", "note")
        table.add_column(
            column,
            justify=justify,
            no_wrap=not wraps,
            overflow="fold" if wraps else "ellipsis",
            min_width=max(len(column), 16 if column == "tensor" else 0),
            ratio=3 if column == "tensor" else None,
        )
    for module in report.modules:
        note = module.note or ""
        values = {
            "tensor": module.name if wide or not note else f"{module.name}\n[dim]({note})[/dim]",
            "kind": module.kind,
            "delta shape": "x".join(map(str, module.shape)) if module.shape else "-",
            "rank": "-" if module.rank is None else str(module.rank),
            "alpha": _num(module.alpha),
            "scale": _num(module.scale),
            "|delta|_F": _num(module.delta_norm),
            "eff. rank": _num(module.effective_rank, 3),
            "|delta|/|W|": _num(module.relative_norm, 3),
            "amplification": _num(module.amplification, 3),
            "note": note,
        }
        table.add_row(*(values[column] for column in columns))
    output.table(table, wide=wide)


def render_checkpoint(output: Output, report: CheckpointReport) -> None:
    from rich.table import Table

    summary = Table(title=f"checkpoint {report.ref}", show_header=False, title_justify="left")
    summary.add_column(style="bold")
    summary.add_column()
    rows = [
        ("model type", f"{report.model_type or '-'} {', '.join(report.architectures)}".strip()),
        ("dtypes", ", ".join(f"{k} ({v:,d})" for k, v in report.dtypes.items())),
        ("parameters", f"{report.num_params:,d} in {report.num_tensors} tensors"),
        ("shards", str(len(report.shards))),
        ("size on disk", human_bytes(report.size_on_disk)),
    ]
    provenance = report.provenance
    if provenance:
        adapters = ", ".join(str(a.get("ref")) for a in provenance.get("adapters", []) if isinstance(a, dict))
        base = provenance.get("base") if isinstance(provenance.get("base"), dict) else {}
        rows.append(("made by", f"loractl {provenance.get('loractl_version')} {provenance.get('operation')}"))
        rows.append(("  base / adapters", f"{base.get('ref')} / {adapters or '-'}"))
        rows.append(("  created", str(provenance.get("created"))))
    else:
        rows.append(("made by", "no loractl.json (not a loractl merge)"))
    for row in rows:
        summary.add_row(*row)
    output.table(summary)
    components = Table(title="components", title_justify="left")
    for column in ("component", "tensors", "parameters", "size"):
        components.add_column(column, justify="left" if column == "component" else "right")
    for group in report.components:
        components.add_row(group.name, str(group.tensors), f"{group.params:,d}", human_bytes(group.bytes))
    output.table(components)
    if len(report.shards) > 1:
        shards = Table(title="shards", title_justify="left")
        for column in ("file", "tensors", "size"):
            shards.add_column(column)
        for shard in report.shards:
            shards.add_row(str(shard["file"]), str(shard["tensors"]), human_bytes(shard["bytes"]))  # type: ignore[arg-type]
        output.table(shards)


def inspect_command(
    adapter: Annotated[
        str, typer.Argument(help="Adapter (or model checkpoint): a local folder or a Hub repo id.", show_default=False)
    ],
    base: Annotated[
        str | None,
        typer.Option("--base", help="Base model to check the adapter against (folder or Hub id).", show_default=False),
    ] = None,
    revision: Annotated[
        str | None,
        typer.Option(
            "--revision",
            "--adapter-revision",
            metavar="REV",
            help="Branch, tag or commit of ADAPTER (or of the checkpoint) when it is a Hub repo id.",
        ),
    ] = None,
    base_revision: Annotated[str | None, revision_option("--base", "--base-revision")] = None,
    wide: Annotated[
        bool, typer.Option("--wide", help="Every column of the modules table, however wide the terminal.")
    ] = False,
    allow_empty: AllowEmptyOpt = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Describe an adapter: type, config, parameter counts, and per module the delta's norm and effective rank.

    Norms come from the factors (QR and an r x r SVD for LoRA), never from the full matrix. With --base, also
    check that the adapter fits (exit 2 naming the tensors that do not), print PEFT's trainable-parameters line,
    and per module |delta|_F/|W|_F and the LoRA paper's amplification factor |delta|_F/|U^T W V|_F (U, V the
    delta's top-r singular vectors). Effective rank = exp(entropy of the singular values normalised to sum 1):
    k equal singular values give k. Given a model checkpoint instead, describe it and its loractl provenance.
    """
    from lora_cli.inspect import AdapterReport, inspect_ref
    from lora_cli.resolve import resolve

    output = Output(json_mode=json_output, quiet=quiet)
    with user_errors(debug, json_output=json_output, done="the report had been made"):
        report = inspect_ref(
            _resolve_either(adapter, revision),
            base=resolve(base, role="base", revision=base_revision) if base else None,
            allow_empty=allow_empty,
        )
    output.json(report)
    if isinstance(report, AdapterReport):
        render_adapter(output, report, wide)
    else:
        render_checkpoint(output, report)
