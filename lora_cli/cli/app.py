"""The Typer application: one module per command, registered here.

The command modules import only typer and the CLI's own helpers at the top; each imports the library (torch,
transformers, huggingface_hub) inside its function, so `--help`, `--version`, a usage error and `verify` start in
a fraction of a second (README: "Start-up").
"""

from __future__ import annotations

from typing import Annotated

import typer

from lora_cli import __version__
from lora_cli.cli._command import LoractlCommand, LoractlGroup
from lora_cli.cli.combine import COMBINE_EXAMPLES, combine_command
from lora_cli.cli.demo import DEMO_EXAMPLES, demo_command
from lora_cli.cli.diff import DIFF_EXAMPLES, diff_command
from lora_cli.cli.extract import EXTRACT_EXAMPLES, extract_command
from lora_cli.cli.inspect import INSPECT_EXAMPLES, inspect_command
from lora_cli.cli.memory import MEMORY_EXAMPLES, memory_command
from lora_cli.cli.merge import MERGE_EXAMPLES, merge_command
from lora_cli.cli.resize import RESIZE_EXAMPLES, resize_command
from lora_cli.cli.unmerge import UNMERGE_EXAMPLES, unmerge_command
from lora_cli.cli.verify import VERIFY_EXAMPLES, verify_command

app = typer.Typer(
    name="loractl",
    cls=LoractlGroup,
    help="Merge, unmerge, diff and inspect PEFT adapters (LoRA and relatives) by streaming safetensors checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

for name, function, examples in (
    ("merge", merge_command, MERGE_EXAMPLES),
    ("diff", diff_command, DIFF_EXAMPLES),
    ("unmerge", unmerge_command, UNMERGE_EXAMPLES),
    ("inspect", inspect_command, INSPECT_EXAMPLES),
    ("memory", memory_command, MEMORY_EXAMPLES),
    ("verify", verify_command, VERIFY_EXAMPLES),
    ("extract", extract_command, EXTRACT_EXAMPLES),
    ("resize", resize_command, RESIZE_EXAMPLES),
    ("combine", combine_command, COMBINE_EXAMPLES),
    ("demo", demo_command, DEMO_EXAMPLES),
):
    app.command(name, epilog=examples, cls=LoractlCommand)(function)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"loractl {__version__}")
        raise typer.Exit


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """loractl: ship adapters. Exit codes: 0 ok, 1 differences found (diff), 2 bad input, 130 interrupted."""


def main() -> None:
    """The `loractl` entry point (lora_cli/__main__.py installs the Ctrl-C handling first, then calls this)."""
    from lora_cli.cli._signals import install_start_up, shutting_down

    install_start_up()
    try:
        app(prog_name="loractl")
    finally:
        shutting_down()
