"""Options shared by several commands, declared once so that they read the same everywhere."""

from __future__ import annotations

from typing import Annotated, Any

import typer


def revision_option(of: str, flag: str = "--revision") -> Any:
    """`--revision` for the command's first argument, named in the help (BASE for merge, MERGED for unmerge...)."""
    return typer.Option(flag, metavar="REV", help=f"Branch, tag or commit of {of} when it is a Hub repo id.")


RevisionOpt = Annotated[str | None, revision_option("BASE")]


def requantize_option(of: str, edited: str) -> Any:
    """`--requantize` for merge (of BASE) and unmerge (of MERGED): the same option, its input named in the help."""
    return typer.Option(
        "--requantize",
        help=f"Write a quantized {of} in its own format (FP8, bitsandbytes 4-bit): {edited} weights quantized again "
        "with new scales, the others copied as stored. Default: a plain checkpoint, dequantized.",
    )


AdapterRevisionOpt = Annotated[
    str | None,
    typer.Option(
        "--adapter-revision", metavar="REV", help="Branch, tag or commit of the adapter(s) when they are Hub repo ids."
    ),
]
DeviceOpt = Annotated[
    str,
    typer.Option(
        "--device", metavar="DEVICE", help="Where deltas are computed: auto (CUDA when present), cpu, cuda or cuda:N."
    ),
]
DtypeOpt = Annotated[
    str,
    typer.Option(
        "--dtype",
        metavar="DTYPE",
        help="Output dtype of floating tensors: auto keeps the input's, or bfloat16 (bf16), float16 (fp16), "
        "float32 (fp32).",
        case_sensitive=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables (for CI).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show a traceback on errors.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists (atomically, at the end).")]
MaxShardOpt = Annotated[
    str | None,
    typer.Option(
        "--max-shard-size", metavar="SIZE", help="Re-shard the output, e.g. 5GB or 500MB (default: the input's layout)."
    ),
]
VerifyOpt = Annotated[
    bool,
    typer.Option(
        "--verify",
        help="Re-read every written tensor and compare checksums before OUT appears; write OUT/SHA256SUMS "
        "(check later with `loractl verify OUT` or `sha256sum -c SHA256SUMS`). Costs a read of OUT.",
    ),
]
AllowEmptyOpt = Annotated[
    bool,
    typer.Option(
        "--allow-empty",
        help="Go on with an adapter that holds no weights for its targets (an empty adapter_model.bin changes "
        "nothing; refused by default).",
    ),
]

DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")

# `--combine` and its parameters, shared by merge and diff (the same names and meanings in both).
CombineOpt = Annotated[
    str,
    typer.Option(
        "--combine",
        help="How the adapters' deltas combine, per tensor: sum (the default: applied in order), ties, dare_linear, "
        "dare_ties or magnitude_prune, as mergekit 0.1.5 defines them on fp32 deltas.",
    ),
]
DensityOpt = Annotated[
    float, typer.Option("--density", help="Share of each delta kept by ties, dare_* and magnitude_prune.")
]
MajoritySignOpt = Annotated[
    str, typer.Option("--majority-sign", help="TIES sign election: total (sign of the weighted sum) or frequency.")
]
SeedOpt = Annotated[
    int,
    typer.Option(
        "--seed",
        help="Seed of DARE's masks. Each adapter's mask on each tensor comes from (seed, its position, the tensor's "
        "name): the same result on every machine, whatever the shard layout or tensor order.",
    ),
]
NoNormalizeOpt = Annotated[
    bool, typer.Option("--no-normalize", help="ties: do not divide by the sum of the agreeing weights.")
]

DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
