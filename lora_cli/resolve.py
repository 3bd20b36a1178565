"""Turn what the user typed (a local folder or a Hugging Face Hub repo id) into a local folder.

Hub repo ids are fetched by `lora_cli.hub`, imported only then: a merge of local folders never loads
`huggingface_hub`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lora_cli.errors import InputError

Role = Literal["base", "adapter", "checkpoint"]

_ROLE_NAMES = {"base": "base model", "adapter": "adapter", "checkpoint": "checkpoint"}


@dataclass(frozen=True)
class ResolvedSource:
    """Where a user reference ended up on disk, and which Hub commit it came from."""

    ref: str  # what the user typed
    path: Path  # local folder holding the files
    revision: str | None  # the revision asked for (None = default branch)
    commit: str | None  # resolved commit sha when it came from the Hub, else None
    is_local: bool


def resolve(ref: str, *, role: Role, revision: str | None = None, stream: bool = False) -> ResolvedSource:
    """Return a local folder for `ref`: the folder itself, or a Hub snapshot of just the files `role` needs.

    `stream` (for a base): the snapshot holds the configs and index only, and shards not complete in the cache
    are read from the Hub by byte range (lora_cli/io/remote.py) instead of being downloaded first."""
    local = Path(ref).expanduser()
    if local.is_dir():
        if revision is not None:
            raise InputError(
                "--revision applies to Hub repo ids, not local folders",
                path=ref,
                fix="drop --revision, or check the wanted revision out into the folder",
            )
        return ResolvedSource(ref=ref, path=local.resolve(), revision=None, commit=None, is_local=True)
    if _looks_like_path(ref) or local.exists():
        what = "is not a folder" if local.exists() else "no such folder"
        raise InputError(
            f"{what}{_did_you_mean(local)}",
            path=ref,
            fix=f"pass the {_ROLE_NAMES[role]} folder holding the files, or a Hub repo id such as org/name",
        )
    from lora_cli.hub import fetch  # huggingface_hub takes a quarter second to import: only for repo ids

    try:
        folder, commit = fetch(ref, adapter=role == "adapter", revision=revision, stream=stream)
    except InputError as exc:
        # A bare name ("llama-bse"), or org/name where a folder "org" exists here, is a repo id to the Hub but
        # most often a mistyped local folder: say first that no such folder exists, then what the Hub said.
        if "/" in ref and not local.parent.is_dir():
            raise
        raise InputError(
            f"no such folder{_did_you_mean(local)}, and as a Hub repo id: {exc.message}", path=ref, fix=exc.fix
        ) from None
    return ResolvedSource(ref=ref, path=folder, revision=revision, commit=commit, is_local=False)


def _did_you_mean(local: Path) -> str:
    """' (did you mean ./llama-base?)' when a folder beside it has a close name; else ''."""
    import difflib

    parent = local.parent if str(local.parent) else Path(".")
    try:
        names = [p.name for p in parent.iterdir() if p.is_dir()]
    except OSError:
        return ""
    close = difflib.get_close_matches(local.name, names, n=1, cutoff=0.75)
    return f" (did you mean {parent / close[0]}?)" if close else ""


def _looks_like_path(ref: str) -> bool:
    """True for references that can only mean a filesystem path, never a repo id."""
    return ref.startswith((".", "/", "~", "\\")) or ref.endswith(("/", "\\")) or "\\" in ref
