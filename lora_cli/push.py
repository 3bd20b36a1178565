"""`--push-to-hub`: upload each finished shard as soon as it is closed, then land everything in ONE commit.

Shards go up with `huggingface_hub.preupload_lfs_files` (the LFS or Xet upload, no commit yet) and their local
copy is removed, so local disk holds about one shard at a time; the small files (configs, index, card, manifest)
and every shard are committed together by one `create_commit` at the end. Nobody sees a half-written repo: an
interrupted run leaves no commit, and a rerun uploads only what the Hub's storage does not already hold (the
LFS batch call answers "already present" for the shards uploaded before the interruption).

Any writer can use it: make a `HubPublisher`, call `open()` before writing, `shard_closed(path)` for each
finished shard, and `commit(folder)` at the end. Tokens, endpoint and offline mode are huggingface_hub's own.
"""

from __future__ import annotations

import contextlib
import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lora_cli.errors import LoraCtlError, OutputError

if TYPE_CHECKING:  # huggingface_hub is imported only when pushing: it costs a quarter second at start-up
    from huggingface_hub import CommitOperationAdd

# Files of ours the commit replaces, and which an overwrite may delete when the new checkpoint no longer has them.
REPLACEABLE = ("*.safetensors", "model.safetensors.index.json")
# What a freshly created Hub repo holds: not "other files".
FRESH_REPO_FILES = {".gitattributes"}
_WRITE_FIX = "log in with a token that has write access to it: `hf auth login` or HF_TOKEN"


class PushError(LoraCtlError):
    """The Hub refused or failed the push."""


@dataclass(frozen=True)
class PushTarget:
    """Where and how to push."""

    repo_id: str
    private: bool = False
    branch: str | None = None
    commit_message: str | None = None
    create_pr: bool = False
    overwrite: bool = False
    keep_local: bool = False


@dataclass
class PushReport:
    """What the push did, for the summary table and `--json`."""

    repo_id: str
    revision: str
    commit: str | None = None
    commit_url: str | None = None
    pr_url: str | None = None
    # Shards handed to the Hub's storage; the ones it already held (from an interrupted run) were not sent again.
    uploaded: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    local_copies_kept: bool = False


class HubPublisher:
    """One push: `open()` checks the target, `shard_closed()` uploads a shard, `commit()` makes the one commit."""

    def __init__(self, target: PushTarget) -> None:
        self.target = target
        self.report = PushReport(repo_id=target.repo_id, revision=target.branch or "main")
        self._additions: list[CommitOperationAdd] = []  # CommitOperationAdd of the shards already uploaded
        self._existing: set[str] = set()
        self._api = None

    @property
    def keep_local(self) -> bool:
        return self.target.keep_local

    def open(self) -> None:
        """Create the repo (and branch) if needed; refuse a repo holding other files unless overwriting.

        Done before any tensor is computed, so a wrong token or repo fails in a second, not after an hour.
        """
        from huggingface_hub import HfApi

        target = self.target
        # A fresh client: the module-level one keeps the endpoint it saw at import.
        self._api = api = HfApi()
        with self._hub_errors("creating"):
            api.create_repo(target.repo_id, private=target.private, exist_ok=True)
            if target.branch is not None:
                api.create_branch(target.repo_id, branch=target.branch, exist_ok=True)
            self._existing = set(api.list_repo_files(target.repo_id, revision=target.branch))
        others = sorted(self._existing - FRESH_REPO_FILES)
        if others and not target.overwrite:
            shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
            raise OutputError(
                f"the Hub repo already holds files ({shown}) at {self.report.revision}",
                path=target.repo_id,
                fix="pass --overwrite to replace them in one commit, or push to another repo or --branch",
            )

    def shard_closed(self, path: Path) -> None:
        """Upload one finished shard (no commit yet) and, unless keeping local copies, remove it from disk."""
        from huggingface_hub import CommitOperationAdd

        addition = CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=str(path))
        with self._hub_errors(f"uploading {path.name}"):
            self._api.preupload_lfs_files(
                self.target.repo_id,
                additions=[addition],
                revision=self.target.branch,
                create_pr=self.target.create_pr,
            )
        self.report.uploaded.append(path.name)
        self._additions.append(addition)
        if not self.target.keep_local:
            path.unlink()

    def commit(self, folder: Path, description: str = "") -> PushReport:
        """One commit: every uploaded shard, every file left in `folder`, and (overwriting) stale shards removed."""
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        names = {a.path_in_repo for a in self._additions}
        operations: list[object] = list(self._additions)
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.name not in names:
                operations.append(CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=str(path)))
                names.add(path.name)
        if self.target.overwrite:
            stale = sorted(
                name
                for name in self._existing - names
                if "/" not in name and any(fnmatch.fnmatch(name, p) for p in REPLACEABLE)
            )
            operations += [CommitOperationDelete(path_in_repo=name) for name in stale]
            self.report.deleted = stale
        message = self.target.commit_message or "Upload merged checkpoint with loractl"
        with self._hub_errors("committing"):
            info = self._api.create_commit(
                self.target.repo_id,
                operations,
                commit_message=message,
                commit_description=description,
                revision=self.target.branch,
                create_pr=self.target.create_pr,
            )
        self.report.commit = info.oid
        self.report.commit_url = info.commit_url
        self.report.pr_url = info.pr_url
        self.report.local_copies_kept = self.target.keep_local
        return self.report

    @contextlib.contextmanager
    def _hub_errors(self, doing: str):
        try:
            yield
        except LoraCtlError:
            raise
        except Exception as exc:
            mapped = map_push_error(exc, self.target.repo_id, doing)
            if mapped is None:
                raise
            raise mapped from exc


def map_push_error(exc: BaseException, repo_id: str, doing: str) -> PushError | None:
    """One actionable line for the Hub's answers to a push; None for errors we do not know.

    huggingface_hub wraps an LFS upload's failure in a RuntimeError, and on plain http a 401 or 403 surfaces as a
    bare HfHubHTTPError: walk the causes and map the status ourselves.
    """
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, HfHubHTTPError):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        import httpx2 as httpx  # huggingface_hub 2.x's HTTP client

        if isinstance(exc, httpx.TransportError):
            return PushError(
                f"lost the connection to the Hub while {doing}",
                path=repo_id,
                fix="re-run the command: shards the Hub already holds are not sent again",
            )
        return None
    status = getattr(getattr(cause, "response", None), "status_code", None)
    if status in (401, 403):
        return PushError(f"the Hub refused the push with HTTP {status} while {doing}", path=repo_id, fix=_WRITE_FIX)
    if isinstance(cause, RevisionNotFoundError):
        return PushError(f"branch not found while {doing}", path=repo_id, fix="check --branch")
    if isinstance(cause, RepositoryNotFoundError) or status == 404:
        return PushError(
            f"Hub repo not found while {doing} (or the token cannot see it)",
            path=repo_id,
            fix=f"check the repo id, or {_WRITE_FIX}",
        )
    return PushError(
        f"the Hub answered HTTP {status} while {doing}",
        path=repo_id,
        fix="try again later (shards already uploaded are not sent again), or check HF_ENDPOINT",
    )


def push_checkpoint(folder: Path, target: PushTarget) -> PushReport:
    """Push a checkpoint folder already on disk: each shard uploaded (and, unless `keep_local`, removed) in turn,
    then the rest of the folder, all in one commit."""
    publisher = HubPublisher(target)
    publisher.open()
    for shard in sorted(Path(folder).glob("*.safetensors")):
        publisher.shard_closed(shard)
    return publisher.commit(Path(folder))
