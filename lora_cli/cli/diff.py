"""`loractl diff A B [--adapter X]`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from lora_cli.cli._common import combine_options, resolve_adapters
from lora_cli.cli._errors import user_errors
from lora_cli.cli._options import (
    AdapterRevisionOpt,
    AllowEmptyOpt,
    CombineOpt,
    DebugOpt,
    DensityOpt,
    DeviceOpt,
    JsonOpt,
    MajoritySignOpt,
    NoNormalizeOpt,
    QuietOpt,
    SeedOpt,
    revision_option,
)
from lora_cli.cli._output import Output, human_bytes
from lora_cli.components import COMPONENTS
from lora_cli.errors import EXIT_DIFFERENT, EXIT_OK, SwappedArgumentsError

if TYPE_CHECKING:
    from rich.table import Table

    from lora_cli.diff import DiffResult, TensorDiff

DIFF_SWAP_FIX = "diff compares two model checkpoints; give the adapter with --adapter ADAPTER"

DIFF_EXAMPLES = """
Examples:

  loractl diff ./base ./merged                          (what did the merge change?)

  loractl diff ./base ./merged --rank                   (rank of each change: a LoRA merge shows its r)

  loractl diff ./base ./merged --adapter ./my-lora      (prove ./merged is ./base + ./my-lora)

  loractl diff meta-llama/Llama-3.2-1B ./merged --all --json > diff.json

Exit codes: 0 nothing differs, 1 something differs (with --adapter: 1 when B is not A merged with it), 2 error.
"""


def _num(value: float | None, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def _status_style(status: str) -> str:
    return {"identical": "green", "changed": "yellow", "dtype_mismatch": "cyan"}.get(status, "red")


def render_diff(output: Output, result: DiffResult, show_all: bool) -> None:
    from rich.table import Table

    output.json(result)
    for warning in result.warnings:
        output.warn(warning)
    counts = ", ".join(f"{n} {s}" for s, n in result.summary.items() if n)
    output.line(f"[bold]{result.a}[/bold] vs [bold]{result.b}[/bold]: {len(result.tensors)} tensors: {counts}")
    for g in result.groups:
        text = f"{g.group} matrices: {g.matrices_differ} of {g.matrices} differ" if g.matrices else ""
        if g.vectors:
            text += ("; " if text else "") + f"{g.group} vectors: {g.vectors_differ} of {g.vectors} differ"
        output.line(text)

    table = Table(title="by component", title_justify="left")
    for column in ("component", "tensors", "differ", "max |A-B|/|A|", "rank"):
        table.add_column(column, justify="left" if column == "component" else "right")
    for c in result.components:
        ranks = "-" if not c.ranks else (str(c.ranks[0]) if len(c.ranks) == 1 else f"{c.ranks[0]}..{c.ranks[-1]}")
        style = "yellow" if c.differ else None
        table.add_row(c.component, str(c.tensors), str(c.differ), _num(c.max_rel_frobenius), ranks, style=style)
    output.table(table)

    layers = Table(title="by layer", title_justify="left")
    for column in ("layer", "tensors", "differ", "components that differ", "max |A-B|/|A|"):
        layers.add_column(column, justify="right" if column in ("tensors", "differ", "max |A-B|/|A|") else "left")
    for layer in result.layers:
        label = "-" if layer.layer is None else f"{layer.stack or ''} {layer.layer}".strip()
        parts = _short_components(layer.components_differ)
        layers.add_row(label, str(layer.tensors), str(layer.differ), parts, _num(layer.max_rel_frobenius))
    output.table(layers)
    if result.experts:
        output.table(_expert_table(result))

    if show_all:
        output.table(_tensor_table(result.tensors, with_check=result.adapter_check is not None))
    if result.provenance_b:
        _render_provenance(output, result.provenance_b)
    if result.adapter_check is not None:
        _render_check(output, result)
    output.line(
        f"read {human_bytes(result.bytes_read)} in {result.seconds:.2f} s, "
        f"peak memory (anonymous) {human_bytes(result.peak_rss_anon_bytes)}"
    )


def _short_components(components: list[str]) -> str:
    """ "self-attention q, self-attention k, MLP up" -> "self-attention q k, MLP up"."""
    by_group: dict[str, list[str]] = {}
    for component in components:
        group, _, part = component.partition(" ")
        by_group.setdefault(group, []).append(part)
    return ", ".join(f"{group} {' '.join(parts)}".strip() for group, parts in by_group.items()) or "-"


def _tensor_table(records: list[TensorDiff], with_check: bool) -> Table:
    from rich.table import Table

    table = Table(title="tensors", title_justify="left")
    with_rank = any(r.rank is not None for r in records)
    table.add_column("name", overflow="fold")
    table.add_column("status", no_wrap=True)
    table.add_column("dtype, shape", overflow="fold")
    for column in ("max |A-B|", "|A-B|/|A|", "differ", "cosine"):
        table.add_column(column, justify="right", no_wrap=True)
    if with_rank:
        table.add_column("rank", justify="right")
    if with_check:
        table.add_column("ulps vs merge", justify="right")
        table.add_column("check", no_wrap=True)
    for r in records:
        dtype = r.dtype_a if r.dtype_a == r.dtype_b else f"{r.dtype_a or '-'}/{r.dtype_b or '-'}"
        shapes = [s for s in (r.shape_a, r.shape_b) if s is not None]
        shape = " / ".join(dict.fromkeys("x".join(map(str, s)) for s in shapes))
        row = [
            r.name,
            f"[{_status_style(r.status)}]{r.status}[/]",
            f"{dtype} {shape}",
            _num(r.max_abs_diff),
            _num(r.rel_frobenius),
            _num(r.frac_differ, ".1%"),
            _num(r.cosine, ".4f"),
        ]
        if with_rank:
            row.append("-" if r.rank is None else str(r.rank))
        if with_check:
            check = "-" if r.adapter_ok is None else ("ok" if r.adapter_ok else "[red]FAIL[/red]")
            row += [_num(r.residual_max_ulps), check]
        table.add_row(*row)
    return table


def _render_provenance(output: Output, record: dict) -> None:
    adapters = ", ".join(str(a.get("ref")) for a in record.get("adapters", []) if isinstance(a, dict)) or "-"
    base = record.get("base") or record.get("merged") or {}
    base_ref = base.get("ref") if isinstance(base, dict) else base
    output.line(
        f"B's provenance (loractl.json): {record.get('operation', '?')} of {base_ref} with {adapters} "
        f"by loractl {record.get('loractl_version', '?')} on {record.get('created', '?')}"
    )


def _render_check(output: Output, result: DiffResult) -> None:
    check = result.adapter_check
    assert check is not None
    colour = {"exact": "green", "pass": "green", "fail": "red"}[check.verdict]
    output.line(
        f"[bold {colour}]{check.verdict.upper()}[/]: B {'is' if check.verdict != 'fail' else 'is not'} A merged "
        f"with {', '.join(check.adapters)}: {check.edited_within_bound} of {check.edited} edited tensors within "
        f"{check.max_ulps_bound:g} ulps (max {check.max_ulps:.3g}, {check.exact_share:.1%} of elements bit-exact), "
        f"{check.untouched_identical} of {check.untouched} untouched tensors identical"
    )
    for problem in check.problems[:10]:
        output.line(f"  {problem}")
    if len(check.problems) > 10:
        output.line(f"  ... and {len(check.problems) - 10} more (see --all or --json)")


def diff_command(
    a: Annotated[
        str, typer.Argument(help="Checkpoint A (the base): a local folder or a Hub repo id.", show_default=False)
    ],
    b: Annotated[str, typer.Argument(help="Checkpoint B (e.g. the merged model).", show_default=False)],
    revision_a: Annotated[str | None, revision_option("A", "--revision-a")] = None,
    revision_b: Annotated[str | None, revision_option("B", "--revision-b")] = None,
    rtol: Annotated[float, typer.Option("--rtol", help="Relative tolerance, as torch.allclose.")] = 1e-5,
    atol: Annotated[float, typer.Option("--atol", help="Absolute tolerance, as torch.allclose.")] = 1e-8,
    rank: Annotated[
        bool, typer.Option("--rank", help="Estimate the rank of each changed 2-D tensor's difference (SVD).")
    ] = False,
    adapter: Annotated[
        list[str] | None,
        typer.Option(
            "--adapter",
            help="Check that B is A merged with this adapter (repeat for stacked adapters, in merge order).",
            show_default=False,
        ),
    ] = None,
    adapter_revision: AdapterRevisionOpt = None,
    max_ulps: Annotated[
        float | None,
        typer.Option(
            "--max-ulps",
            # The default lives in lora_cli.diff (DEFAULT_MAX_ULPS), which imports torch; --help must not.
            help="With --adapter: largest residual (ulps of B's dtype) that still passes (default: 2).",
            show_default=False,
        ),
    ] = None,
    combine: CombineOpt = "sum",
    density: DensityOpt = 1.0,
    majority_sign: MajoritySignOpt = "total",
    seed: SeedOpt = 0,
    no_normalize: NoNormalizeOpt = False,
    device: DeviceOpt = "auto",
    show_all: Annotated[bool, typer.Option("--all", help="List every tensor, not only the summaries.")] = False,
    allow_empty: AllowEmptyOpt = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Compare two checkpoints tensor by tensor and group what differs by layer and component.

    Streams both (any shard layout, any dtypes), so memory stays flat. "identical" means within tolerance:
    |A - B| <= atol + rtol * |B| everywhere, as torch.allclose(A, B) (NaN equals NaN; integers must match), so it
    is not always bit-identical. When the dtypes differ, both are compared at the coarser dtype's precision: a
    pure cast is "dtype_mismatch" (same values, other dtype), a real change is "changed". With --adapter, each
    tensor the adapters edit is recomputed from A as loractl merge does and B's residual is reported in ulps;
    --combine (with its --density, --majority-sign, --seed, --no-normalize) recomputes a `merge --combine`.
    """
    from lora_cli.diff import DiffOptions, diff
    from lora_cli.resolve import resolve

    output = Output(json_mode=json_output, quiet=quiet)
    with user_errors(debug, json_output=json_output, done="the comparison had finished"):
        source_a = resolve(a, role="checkpoint", revision=revision_a)
        source_b = resolve(b, role="checkpoint", revision=revision_b)
        specs = resolve_adapters(adapter, adapter_revision, allow_empty) if adapter else None
        options = DiffOptions(rtol=rtol, atol=atol, rank=rank, device=device)
        if max_ulps is not None:
            options.max_ulps = max_ulps
        combining = combine_options(combine, density, majority_sign, seed, no_normalize)
        with output.progress("comparing") as bar:
            try:
                result = diff(
                    source_a, source_b, options, specs, progress=bar, on_start=bar.set_total, combine=combining
                )
            except SwappedArgumentsError as exc:
                raise SwappedArgumentsError(exc.message, path=exc.path, fix=DIFF_SWAP_FIX) from None
    render_diff(output, result, show_all)
    # With --adapter the exit code is the verdict: the difference itself is expected.
    failed = result.adapter_check.verdict == "fail" if result.adapter_check is not None else result.differ
    raise typer.Exit(EXIT_DIFFERENT if failed else EXIT_OK)


def _expert_table(result: DiffResult) -> Table:
    """Routed experts stored apart, one row per layer: how many of its experts differ, and which."""
    from rich.table import Table

    table = Table(title="experts by layer", title_justify="left")
    for column in ("layer", "experts", "differ", "experts that differ", "components that differ", "max |A-B|/|A|"):
        table.add_column(column, justify="left" if "that differ" in column else "right")
    by_layer: dict[int | None, list] = {}
    for summary in result.experts:
        by_layer.setdefault(summary.layer, []).append(summary)
    for layer, members in by_layer.items():
        differing = [m for m in members if m.differ]
        parts = sorted({c for m in differing for c in m.components_differ}, key=COMPONENTS.index)
        table.add_row(
            "-" if layer is None else str(layer),
            str(len(members)),
            str(len(differing)),
            _ranges([m.expert for m in differing]),
            _short_components(parts),
            _num(max((m.max_rel_frobenius for m in differing if m.max_rel_frobenius is not None), default=None)),
        )
    return table


def _ranges(numbers: list[int]) -> str:
    """0-3, 7, 9-12: a list of expert indices, short."""
    if not numbers:
        return "-"
    spans: list[list[int]] = []
    for n in sorted(numbers):
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
