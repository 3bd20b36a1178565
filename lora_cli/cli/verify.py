"""`loractl verify OUT`: check a checkpoint written with --verify against its SHA256SUMS manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lora_cli.cli._errors import user_errors
from lora_cli.cli._options import DebugOpt, JsonOpt, QuietOpt
from lora_cli.cli._output import Output

VERIFY_EXAMPLES = """
Examples:

  loractl merge ./base ./lora ./merged --verify && loractl verify ./merged

  cd ./merged && sha256sum -c SHA256SUMS                  (the same check without loractl)
"""


def verify_command(
    out: Annotated[Path, typer.Argument(help="A checkpoint folder holding SHA256SUMS.", show_default=False)],
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Check every file of OUT against the SHA-256 in its SHA256SUMS, and every shard's header.

    Exit 0 when all match, 2 (with the file named) when one is missing, altered or unlisted.
    """
    from lora_cli.verify import check_manifest  # headers and checksums only: no torch

    output = Output(json_mode=json_output, quiet=quiet)
    with user_errors(debug, json_output=json_output, done="the check had finished"):
        report = check_manifest(out)
    output.json(report)
    output.line(f"verified: {report.tensors} tensors, {report.files} files, {len(report.sha256)} checksums")
