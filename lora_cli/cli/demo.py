"""`loractl demo`: the whole job on a tiny model made on the spot, no network needed."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from lora_cli.cli._common import render_summary
from lora_cli.cli._errors import user_errors
from lora_cli.cli._options import DebugOpt, DeviceOpt, JsonOpt, QuietOpt
from lora_cli.cli._output import Output
from lora_cli.errors import OutputError

DEMO_EXAMPLES = """
Examples:

  loractl demo                                  (build, merge, check and clean up; about 10 s on a laptop)

  loractl demo --keep ./demo                    (keep ./demo/base, ./demo/adapter and ./demo/merged to try the
                                                 other commands on: loractl inspect ./demo/adapter)

  loractl demo --json                           (the result as one JSON object)
"""


def demo_command(
    keep: Annotated[
        Path | None, typer.Option("--keep", help="Build in this (new) folder and keep it, instead of a temp folder.")
    ] = None,
    device: DeviceOpt = "auto",
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Build a tiny Llama and a LoRA adapter, merge them, and check the merged model's logits.

    The check loads the merged checkpoint with plain transformers (no adapter code) and compares its logits
    with the base model running the LoRA at run time. Exit code 0 when they match.
    """
    from lora_cli.demo import run_demo
    from lora_cli.engine import WriteOptions

    output = Output(json_mode=json_output, quiet=quiet)
    with user_errors(debug, json_output=json_output, done="the demo had finished"):
        if keep is not None and keep.exists():
            raise OutputError("already exists", path=keep, fix="pass a new folder to --keep")
        workdir = keep or Path(tempfile.mkdtemp(prefix="loractl-demo-"))
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            with output.progress("merging") as bar:
                result = run_demo(workdir, WriteOptions(device=device), bar)
        finally:
            if keep is None:
                shutil.rmtree(workdir, ignore_errors=True)
        output.json(result)
        if keep is not None:
            output.line(
                f"built a tiny Llama in {result.base} and a rank-8 LoRA on all linear layers in {result.adapter}"
            )
        else:  # the folders are gone already: naming them would send the reader to look for them
            output.line("built a tiny Llama and a rank-8 LoRA on all linear layers (in a temporary folder)")
        render_summary(output, result.summary, "merge", as_json=False, show_output=keep is not None)
        verdict = "[green]match[/green]" if result.logits_match else "[red]DIFFER[/red]"
        output.line(
            f"logits of the merged checkpoint (plain transformers) vs the base running the LoRA: max |diff| = "
            f"{result.max_logit_difference:.2e} -> {verdict}"
        )
        if keep is None:
            output.line("(temporary files removed; pass --keep DIR to keep them)")
        if not result.logits_match:
            raise typer.Exit(1)
