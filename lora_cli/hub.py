"""Fetch what a merge needs from the Hugging Face Hub, through the real `huggingface_hub` client.

Its cache, auth (HF_TOKEN, `hf auth login`), HF_HUB_OFFLINE and HF_ENDPOINT all behave as users expect; only the
files a merge needs are fetched, and the client's failures become one actionable line each.
"""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path

try:  # huggingface_hub 2.x speaks through httpx2, 1.x through httpx
    import httpx2 as httpx
except ImportError:  # pragma: no cover - depends on the installed huggingface_hub
    import httpx  # type: ignore[no-redef]
from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    DisabledRepoError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from lora_cli.errors import InputError
from lora_cli.filenames import ADAPTER_CONFIG, ADAPTER_PICKLE, ADAPTER_SAFETENSORS, INDEX_FILE

# Configs and tokenizer files of a base; weights are chosen separately (see _fetch_model) so stray copies
# such as Mistral's consolidated.safetensors are not downloaded. Pickles are never fetched for a base.
MODEL_SIDE_PATTERNS = (
    "*.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "*.tiktoken",
    "vocab.txt",
    "merges.txt",
    "*.jinja",
    "README.md",  # the base's model card: kept beside the merge's own as BASE_README.md (its license applies)
)
# Subfolders hold other components (diffusers pipelines, original/ exports): loractl reads the repo root only.
ROOT_ONLY = ["*/*"]

_COMMIT_RE = re.compile(r"[0-9a-f]{40}")
_LOGIN_FIX = "log in with `hf auth login` or set HF_TOKEN, and accept the model's terms on its Hub page if it is gated"
# EDQUOT is missing on some platforms.
_CACHE_WRITE_ERRNOS = {errno.ENOSPC, errno.EACCES, errno.EROFS, getattr(errno, "EDQUOT", errno.ENOSPC)}


def fetch(ref: str, *, adapter: bool, revision: str | None, stream: bool = False) -> tuple[Path, str | None]:
    """A snapshot of just the files an adapter (or a model) needs from the Hub repo `ref`: its folder and commit.

    `resolve.resolve` makes the `ResolvedSource`; this module never imports it back. `stream` (a model): the
    snapshot holds configs and index only, and the shards are read by range (see `_stream_model`).
    """
    try:
        validate_repo_id(ref)
    except HFValidationError:
        raise InputError(
            "neither an existing folder nor a valid Hugging Face repo id",
            path=ref,
            fix="pass an existing folder, or a repo id of the form `name` or `org/name`",
        ) from None

    try:
        if adapter:
            folder = _fetch_adapter(ref, revision)
        elif stream and not constants.is_offline_mode():
            folder = _stream_model(ref, revision)
        else:
            folder = _fetch_model(ref, revision)
    except InputError:
        raise
    except Exception as exc:
        mapped = _map_hub_error(exc, ref, revision)
        if mapped is None:
            raise
        raise mapped from exc
    return folder, folder.name if _COMMIT_RE.fullmatch(folder.name) else None


def _snapshot(repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, ignore_patterns=ROOT_ONLY))


def _fetch_model(repo_id: str, revision: str | None) -> Path:
    """Fetch configs and tokenizer first, then only the safetensors shards the index names (or all, if no index)."""
    folder = _snapshot(repo_id, revision, list(MODEL_SIDE_PATTERNS))
    # Pin the second call to the commit the first one resolved, so a branch moving in between cannot mix revisions.
    pinned = folder.name if _COMMIT_RE.fullmatch(folder.name) else revision
    index = folder / INDEX_FILE
    weights = _index_shards(repo_id, index) if index.is_file() else ["*.safetensors"]
    folder = _snapshot(repo_id, pinned, weights)
    if not any(folder.glob("*.safetensors")):
        raise InputError(
            f"Hub repo has no .safetensors weights at {_rev(revision)}; loractl never loads pickled (.bin) weights",
            path=repo_id,
            fix="use a repo or --revision that has safetensors weights, or convert it to safetensors locally",
        )
    if index.is_file():
        missing = [name for name in weights if not (folder / name).is_file()]
        if missing:
            raise InputError(
                f"{INDEX_FILE} names shards the repo does not have: {', '.join(missing[:3])}",
                path=f"{repo_id}/{INDEX_FILE}",
                fix="report it to the repo owner, or pass a local folder with all shards",
            )
    return folder


def _stream_model(repo_id: str, revision: str | None) -> Path:
    """Configs, tokenizer and index into the cache; each weight shard either complete in the cache already, or
    registered to be read from the Hub by byte range at the commit the configs came from."""
    from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache

    from lora_cli.io.remote import RemoteShard, register

    folder = _snapshot(repo_id, revision, list(MODEL_SIDE_PATTERNS))
    commit = folder.name if _COMMIT_RE.fullmatch(folder.name) else None
    if commit is None:  # a snapshot folder is always named by its commit; anything else cannot be pinned
        return _fetch_model(repo_id, revision)
    index = folder / INDEX_FILE
    if index.is_file():
        weights = _index_shards(repo_id, index)
    else:
        listed = [n for n in HfApi().list_repo_files(repo_id, revision=commit) if "/" not in n]
        safetensors = [n for n in listed if n.endswith(".safetensors")]
        weights = ["model.safetensors"] if "model.safetensors" in safetensors else sorted(safetensors)
        if not weights:
            raise InputError(
                f"Hub repo has no .safetensors weights at {_rev(revision)}; loractl never loads pickled (.bin) weights",
                path=repo_id,
                fix="use a repo or --revision that has safetensors weights, or convert it to safetensors locally",
            )
    for name in weights:
        if isinstance(try_to_load_from_cache(repo_id, name, revision=commit), str):
            continue  # complete in the cache: read from there
        meta = get_hf_file_metadata(hf_hub_url(repo_id, name, revision=commit, endpoint=constants.ENDPOINT))
        # Resolved once here: every range goes to `meta.location` (on the Hub, the redirect's signed CDN link).
        register(RemoteShard(folder / name, repo_id, name, commit, int(meta.size or 0), meta.location))
    return folder


def _index_shards(repo_id: str, index: Path) -> list[str]:
    try:
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise InputError(
            f"{INDEX_FILE} is not a valid safetensors index",
            path=f"{repo_id}/{INDEX_FILE}",
            fix="fix or re-upload the index in the repo, or pass a local folder",
        ) from None


def _fetch_adapter(repo_id: str, revision: str | None) -> Path:
    """Fetch the adapter config and safetensors weights; fall back to adapter_model.bin only when there are none."""
    folder = _snapshot(repo_id, revision, [ADAPTER_CONFIG, ADAPTER_SAFETENSORS])
    if not (folder / ADAPTER_SAFETENSORS).is_file():
        # The first call cached the repo's file list, so this pinned second call lists nothing over the network.
        pinned = folder.name if _COMMIT_RE.fullmatch(folder.name) else revision
        folder = _snapshot(repo_id, pinned, [ADAPTER_PICKLE])
    if not (folder / ADAPTER_CONFIG).is_file():
        raise InputError(
            f"Hub repo has no {ADAPTER_CONFIG} at {_rev(revision)}, so it is not a PEFT adapter",
            path=repo_id,
            fix="pass the adapter's repo id, not the base model's, or a local adapter folder",
        )
    if not (folder / ADAPTER_SAFETENSORS).is_file() and not (folder / ADAPTER_PICKLE).is_file():
        raise InputError(
            f"Hub repo has {ADAPTER_CONFIG} but no {ADAPTER_SAFETENSORS} or {ADAPTER_PICKLE} at {_rev(revision)}",
            path=repo_id,
            fix="check the repo id and --revision; the adapter weights must sit at the repo root",
        )
    return folder


def _rev(revision: str | None) -> str:
    return "the default branch" if revision is None else f"revision '{revision}'"


def _map_hub_error(exc: Exception, repo_id: str, revision: str | None) -> InputError | None:
    """Translate a `huggingface_hub`/httpx failure into one actionable line; None for errors we do not know."""
    where = repo_id if revision is None else f"{repo_id}@{revision}"
    offline_fix = "run once online to download it, or pass a local folder"
    interrupted_fix = "re-run the command to resume: files already downloaded are kept in the Hugging Face cache"
    # Order matters: the Hub's HTTP errors are also OSErrors, and GatedRepoError is a RepositoryNotFoundError.
    if isinstance(exc, RevisionNotFoundError):
        return InputError(
            f"revision '{revision}' not found in this Hub repo",
            path=repo_id,
            fix="check the branch, tag or commit sha given to --revision",
        )
    if isinstance(exc, GatedRepoError):
        return InputError("gated Hub repo: this account has not been granted access", path=where, fix=_LOGIN_FIX)
    if isinstance(exc, DisabledRepoError):
        return InputError("this Hub repo has been disabled", path=where, fix="use another repo or a local folder")
    if isinstance(exc, RepositoryNotFoundError):
        if _status(exc) == 401:
            return InputError(
                "Hub repo not found, or it is private and you are not logged in",
                path=where,
                fix=f"check the repo id; if it is private or gated, {_LOGIN_FIX}",
            )
        # A bare name may be a mistyped local folder as much as a repo id: resolve() says so first.
        return InputError(
            "Hub repo not found",
            path=where,
            fix="check the repo id, or log in if it is private: `hf auth login` or HF_TOKEN",
        )
    if isinstance(exc, HfHubHTTPError):
        status = _status(exc)
        if status in (401, 403):
            return InputError(
                f"the Hub refused access with HTTP {status}: the token is missing, invalid or lacks permission",
                path=where,
                fix=_LOGIN_FIX,
            )
        return InputError(
            f"the Hub answered HTTP {status}",
            path=where,
            fix="try again later, check HF_ENDPOINT, or pass a local folder",
        )
    if isinstance(exc, IncompleteSnapshotError):
        why = "HF_HUB_OFFLINE is set" if constants.is_offline_mode() else "the Hub cannot be reached"
        return InputError(
            f"the cached copy is incomplete, likely from an interrupted download, and {why}",
            path=where,
            fix="run once online to complete it, or pass a local folder",
        )
    if isinstance(exc, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        if constants.is_offline_mode():
            return InputError(
                "not in the local Hugging Face cache, or only partly, and HF_HUB_OFFLINE is set",
                path=where,
                fix=f"unset HF_HUB_OFFLINE and {offline_fix}",
            )
        return InputError(
            f"not in the local Hugging Face cache, or only partly, and the Hub at {constants.ENDPOINT} "
            "cannot be reached",
            path=where,
            fix=f"check your network and HF_ENDPOINT, {offline_fix}",
        )
    if isinstance(exc, (httpx.ConnectError, httpx.TimeoutException)):
        return InputError(
            f"lost the connection to the Hub at {constants.ENDPOINT} while downloading",
            path=where,
            fix=f"check your network, then {interrupted_fix}",
        )
    if isinstance(exc, httpx.TransportError):
        return InputError(
            "the download was interrupted: the connection dropped mid-file", path=where, fix=interrupted_fix
        )
    if isinstance(exc, OSError):
        if "Consistency check failed" in str(exc):
            return InputError(
                "the download was interrupted: a file came out truncated", path=where, fix=interrupted_fix
            )
        if exc.errno in _CACHE_WRITE_ERRNOS:
            return InputError(
                f"cannot write to the Hugging Face cache at {constants.HF_HUB_CACHE}: {exc.strerror}",
                path=where,
                fix="free some space, or set HF_HUB_CACHE / HF_HOME to a writable folder",
            )
    return None


def _status(exc: HfHubHTTPError) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)
