"""The Typer application: one module per command, registered here."""

from __future__ import annotations

from typing import Annotated

import typer

from lora_cli import __version__
from lora_cli.cli.demo import demo_command
from lora_cli.cli.merge import MERGE_EXAMPLES, merge_command

app = typer.Typer(
    name="loractl",
    help="Merge, unmerge, diff and inspect PEFT adapters (LoRA and relatives) by streaming safetensors checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

app.command("merge", epilog=MERGE_EXAMPLES)(merge_command)
app.command("demo")(demo_command)


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
    app()
