"""The Typer application: one module per command, registered here."""

from __future__ import annotations

from typing import Annotated

import typer

from lora_cli import __version__
from lora_cli.cli.combine import COMBINE_EXAMPLES, combine_command
from lora_cli.cli.demo import demo_command
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
    help="Merge, unmerge, diff and inspect PEFT adapters (LoRA and relatives) by streaming safetensors checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

app.command("merge", epilog=MERGE_EXAMPLES)(merge_command)
app.command("diff", epilog=DIFF_EXAMPLES)(diff_command)
app.command("unmerge", epilog=UNMERGE_EXAMPLES)(unmerge_command)
app.command("inspect", epilog=INSPECT_EXAMPLES)(inspect_command)
app.command("memory", epilog=MEMORY_EXAMPLES)(memory_command)
app.command("verify", epilog=VERIFY_EXAMPLES)(verify_command)
app.command("extract", epilog=EXTRACT_EXAMPLES)(extract_command)
app.command("resize", epilog=RESIZE_EXAMPLES)(resize_command)
app.command("combine", epilog=COMBINE_EXAMPLES)(combine_command)
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
