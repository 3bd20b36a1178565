"""Options shared by the commands that write checkpoints and can push them to the Hub, and their handling."""

from __future__ import annotations

import shlex
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from lora_cli.errors import InputError

PushOpt = Annotated[
    str | None,
    typer.Option(
        "--push-to-hub",
        metavar="REPO",
        help="Upload to this Hub repo: each shard as soon as it is written (then removed locally), everything in "
        "one commit at the end. Positional arguments are then all adapters; --out keeps a local copy.",
    ),
]
OutOpt = Annotated[
    Path | None,
    typer.Option("--out", help="The output folder (instead of the last positional argument; optional when pushing)."),
]
PrivateOpt = Annotated[bool, typer.Option("--private", help="Create the Hub repo private (when it does not exist).")]
BranchOpt = Annotated[str | None, typer.Option("--branch", help="Push to this branch (created if missing).")]
CommitMessageOpt = Annotated[str | None, typer.Option("--commit-message", help="The commit's summary line.")]
CreatePrOpt = Annotated[bool, typer.Option("--create-pr", help="Open a pull request with the commit instead.")]
KeepLocalOpt = Annotated[
    bool, typer.Option("--keep-local", help="When pushing, keep the shards in --out too (needs the whole size).")
]
DownloadOpt = Annotated[
    bool,
    typer.Option(
        "--download",
        help="Download a Hub base (or MERGED) into the Hugging Face cache first, instead of streaming its tensors "
        "by range.",
    ),
]


@dataclass(frozen=True)
class PushArgs:
    repo: str | None
    private: bool = False
    branch: str | None = None
    commit_message: str | None = None
    create_pr: bool = False
    keep_local: bool = False


def command_line() -> str:
    """The command as typed, for the model card's "Reproduce" section."""
    return shlex.join(["loractl", *sys.argv[1:]])


def local_out(positionals: list[str], out: Path | None, push: PushArgs) -> str | None:
    """The folder the command will leave on disk (for the interruption message), before `outputs` splits it off."""
    if out is not None:
        return str(out)
    return positionals[-1] if push.repo is None and positionals else None


@contextmanager
def outputs(
    command: str, positionals: list[str], out: Path | None, push: PushArgs, *, overwrite: bool
) -> Iterator[tuple[list[str], Path, object | None]]:
    """Split ADAPTER... [OUT], and prepare the push: yields (adapter args, output folder, publisher or None).

    Pushing without --out writes into a temporary folder (under TMPDIR) that is removed afterwards.
    """
    if out is None and push.repo is None:
        if len(positionals) < 2:
            raise InputError(f"{command} needs at least one ADAPTER and then OUT", fix=f"see loractl {command} --help")
        *positionals, last = positionals
        out = Path(last)
    if not positionals:
        raise InputError(f"{command} needs at least one ADAPTER", fix=f"see loractl {command} --help")
    if push.repo is None:
        yield positionals, out, None
        return
    if push.keep_local and out is None:
        raise InputError("--keep-local needs --out: the folder to keep the checkpoint in", fix="add --out DIR")
    from lora_cli.push import HubPublisher, PushTarget

    publisher = HubPublisher(
        PushTarget(
            repo_id=push.repo,
            private=push.private,
            branch=push.branch,
            commit_message=push.commit_message,
            create_pr=push.create_pr,
            overwrite=overwrite,
            keep_local=push.keep_local,
        )
    )
    publisher.open()
    staging = None
    if out is None:
        staging = Path(tempfile.mkdtemp(prefix="loractl-push-"))
        out = staging / "checkpoint"
    try:
        yield positionals, out, publisher
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def push_rows(table: Table, report: object | None) -> None:
    """The push's rows of a summary table."""
    if report is None:
        return
    where = f"{report.repo_id} ({report.revision})"
    table.add_row("pushed to", where)
    table.add_row("commit", report.pr_url or report.commit_url or "")
    table.add_row("shards uploaded", str(len(report.uploaded)))
    if report.deleted:
        table.add_row("deleted from the repo", ", ".join(report.deleted))
