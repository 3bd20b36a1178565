"""`loractl merge BASE ADAPTER [ADAPTER ...] OUT`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lora_cli.cli._common import check_dtype, combine_options, parse_size, render_summary, resolve_adapters
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
    CombineOpt,
    DebugOpt,
    DensityOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    MajoritySignOpt,
    MaxShardOpt,
    NoNormalizeOpt,
    OverwriteOpt,
    QuietOpt,
    RevisionOpt,
    SeedOpt,
    VerifyOpt,
    requantize_option,
)
from lora_cli.cli._output import Output
from lora_cli.errors import AdapterMismatchError

MERGE_EXAMPLES = """
Examples:

  loractl merge meta-llama/Llama-3.2-1B ./my-lora ./merged

  loractl merge ./base ./sft-lora ./rl-lora ./merged        (stacked, applied in order)

  loractl merge ./base ./a@0.7 ./b@0.3 ./merged            (weighted sum of deltas)

  loractl merge ./base ./lora ./merged --dtype bf16 --max-shard-size 2GB --json

  loractl merge meta-llama/Llama-3.1-8B me/my-lora --push-to-hub me/llama-merged --verify
                                (streams the base, uploads shard by shard, one commit; no OUT needed)

  loractl merge ./base ./a@1 ./b@1 ./merged --combine ties --density 0.5          (TIES, as mergekit)

  loractl merge ./base ./a@0.5 ./b@0.5 ./merged --combine dare_linear --density 0.3 --seed 7

  loractl merge ./llama-bnb-4bit ./qlora ./merged           (quantized base: written dequantized, bf16)

  loractl merge ./Qwen3-8B-FP8 ./lora ./merged --requantize (the base's own format, new scales)
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
    out_option: OutOpt = None,
    push_to_hub: PushOpt = None,
    private: PrivateOpt = False,
    branch: BranchOpt = None,
    commit_message: CommitMessageOpt = None,
    create_pr: CreatePrOpt = False,
    keep_local: KeepLocalOpt = False,
    download: DownloadOpt = False,
    combine: CombineOpt = "sum",
    density: DensityOpt = 1.0,
    majority_sign: MajoritySignOpt = "total",
    seed: SeedOpt = 0,
    no_normalize: NoNormalizeOpt = False,
    peft_compatible: Annotated[
        bool,
        typer.Option(
            "--peft-compatible",
            help="Combine as PEFT's add_weighted_adapter does, then merge: --combine takes its combination_type "
            "(linear, cat, svd, ties, ties_svd, dare_linear, dare_ties, dare_linear_svd, dare_ties_svd, "
            "magnitude_prune, magnitude_prune_svd), quirks included (README). DARE matches PEFT in distribution only.",
        ),
    ] = False,
    svd_rank: Annotated[
        int | None, typer.Option("--svd-rank", help="With --peft-compatible: PEFT's svd_rank (default the largest).")
    ] = None,
    allow_empty: AllowEmptyOpt = False,
    requantize: Annotated[bool, requantize_option("base", "edited")] = False,
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
    from lora_cli.peft_weighted import PeftCombine
    from lora_cli.resolve import resolve

    output = Output(json_mode=json_output, quiet=quiet)
    push = PushArgs(push_to_hub, private, branch, commit_message, create_pr, keep_local)
    with (
        user_errors(debug, json_output=json_output, out=local_out(adapters_and_out, out_option, push)),
        outputs("merge", adapters_and_out, out_option, push, overwrite=overwrite) as found,
    ):
        adapter_args, out, publisher = found
        options = WriteOptions(
            device=device,
            dtype=check_dtype(dtype),
            max_shard_bytes=parse_size(max_shard_size),
            overwrite=overwrite,
            check_finite=not no_safe_merge,
            verify=verify,
            publish=publisher,
            command=command_line(),
        )
        base_source = resolve(base, role="base", revision=revision, stream=not download)
        specs = resolve_adapters(adapter_args, adapter_revision, allow_empty)
        lineage = source_lineage(base_source, [spec.source for spec in specs])
        if strict and lineage:
            raise AdapterMismatchError(lineage[0], fix="check the adapters and the base, or drop --strict")
        peft = None
        if peft_compatible:
            peft = PeftCombine(
                combination_type=combine,
                svd_rank=svd_rank,
                density=density,
                majority_sign=majority_sign,
                seed=seed,
            )
            combine = "sum"  # the combination happens in PEFT's way, before the merge
        combining = combine_options(combine, density, majority_sign, seed, no_normalize)
        with output.progress("merging") as bar:
            summary = merge(
                base_source,
                specs,
                Path(out),
                options,
                progress=bar,
                on_plan=lambda p: bar.set_total(p.output_bytes),
                combine=combining,
                peft=peft,
                requantize=requantize,
            )
    summary.warnings[:0] = lineage
    if publisher is not None and out_option is None:
        summary.output = f"{push_to_hub} (no local copy)"
    render_summary(output, summary, "merge")
    if peft is not None:
        output.line(f"combined as PEFT's add_weighted_adapter(combination_type={peft.combination_type!r})")
    elif combining.method != "sum":
        normalized = "normalized" if combining.normalized else "not normalized"
        output.line(
            f"combined with {combining.method} (density {combining.density:g}, "
            f"majority sign {combining.majority_sign}, seed {combining.seed}, {normalized})"
        )
