"""Streaming a base from the Hub by byte range and pushing the merge shard by shard in one commit, against the fake
Hub of tests/hub_server.py: the real huggingface_hub client talks to it over HTTP (Xet off: the fake speaks LFS)."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import constants
from peft import LoraConfig
from typer.testing import CliRunner

from lora_cli.cli.app import app
from lora_cli.engine import WriteOptions
from lora_cli.io import remote
from lora_cli.merge import merge
from lora_cli.push import HubPublisher, PushTarget, push_checkpoint
from lora_cli.resolve import resolve
from lora_cli.sources import AdapterSpec, local_source
from tests.builders import make_adapter, save_base, tiny_llama
from tests.hub_server import FakeHub, point_client_at

REPO_ROOT = Path(__file__).resolve().parents[1]
FACTORY = functools.partial(tiny_llama, torch.bfloat16)
WRITE, READ = "hf_write_token", "hf_read_token"
runner = CliRunner()


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A 3-shard bf16 base with a model card, a LoRA adapter, and the local merge of the two (the reference)."""
    root = tmp_path_factory.mktemp("pair")
    base = save_base(FACTORY(), root / "base", max_shard_size="20KB")
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# The base's own card\n")
    lora = root / "lora"
    make_adapter(FACTORY, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False), lora)
    done = runner.invoke(app, ["merge", str(base), str(lora), str(root / "local")])
    assert done.exit_code == 0, done.output
    return base, lora, root / "local"


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pair):
    server = FakeHub()
    server.start()
    point_client_at(server, tmp_path / "hf", monkeypatch)
    monkeypatch.setattr(remote, "RETRY_WAIT_S", 0.0)
    monkeypatch.setattr(remote, "HEADER_GUESS", 512)  # tiny shards: the header alone, not the whole file
    server.write_tokens.add(WRITE)
    server.tokens.add(READ)
    base, _, _ = pair
    server.add_repo("org/base", {p.name: p.read_bytes() for p in base.iterdir()})
    try:
        yield server
    finally:
        server.release_uploads()
        server.stop()


def shards(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.safetensors"))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def invoke(*args: object, token: str | None = WRITE, monkeypatch: pytest.MonkeyPatch):
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setattr(sys, "argv", ["loractl", *map(str, args)])  # what the card's "Reproduce" section shows
    return runner.invoke(app, [str(a) for a in args])


def disk_bytes(*folders: Path) -> int:
    """Bytes on disk under `folders`; the cache's snapshot symlinks point at its blobs and count once."""
    return sum(
        p.stat().st_size for f in folders if f.exists() for p in f.rglob("*") if p.is_file() and not p.is_symlink()
    )


def card_meta(card: bytes) -> dict:
    text = card.decode()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


# -- streaming the base ------------------------------------------------------------------------------------------


def test_streamed_merge_matches_the_local_merge_and_never_downloads_a_shard(hub, pair, tmp_path, monkeypatch):
    base, lora, local = pair
    out = tmp_path / "out"
    done = invoke("merge", "org/base", lora, out, token=None, monkeypatch=monkeypatch)
    assert done.exit_code == 0, done.output
    assert shards(out) == shards(local) and len(shards(out)) == 3
    for name in shards(local):
        assert (out / name).read_bytes() == (local / name).read_bytes()
    # Every shard request was a byte range, and no shard reached the Hugging Face cache.
    gets = [r for r in hub.requests if r.method == "GET" and r.path.endswith(".safetensors")]
    assert gets and all(r.headers.get("range", "").startswith("bytes=") for r in gets)
    assert not list((tmp_path / "hf").rglob("*.safetensors"))
    # Far fewer bytes asked for than whole files would be... but every tensor byte exactly once, plus headers.
    asked = sum(int(e) - int(s) + 1 for s, e in (r.headers["range"][6:].split("-") for r in gets))
    assert asked < sum((base / n).stat().st_size for n in shards(base)) + 3 * 512


def test_base_complete_in_the_cache_is_read_from_it(hub, pair, tmp_path, monkeypatch):
    _, lora, local = pair
    first = invoke("merge", "org/base", lora, tmp_path / "a", "--download", token=None, monkeypatch=monkeypatch)
    assert first.exit_code == 0, first.output
    before = len(hub.requests)
    again = invoke("merge", "org/base", lora, tmp_path / "b", token=None, monkeypatch=monkeypatch)
    assert again.exit_code == 0, again.output
    assert not [r for r in hub.requests[before:] if r.method == "GET" and r.path.endswith(".safetensors")]
    for name in shards(local):
        assert (tmp_path / "b" / name).read_bytes() == (local / name).read_bytes()


def test_dropped_range_request_is_resumed_from_the_byte_it_stopped_at(hub, pair, tmp_path, monkeypatch):
    _, lora, local = pair
    name = shards(local)[0]
    hub.interrupt("org/base", name, [10**9, 10**9, 1000])  # the header reads pass; the next range drops
    done = invoke("merge", "org/base", lora, tmp_path / "out", token=None, monkeypatch=monkeypatch)
    assert done.exit_code == 0, done.output
    spans = [tuple(int(x) for x in r.headers["range"][6:].split("-")) for r in hub.file_gets(name)]
    # The dropped request (the third GET: the header takes two) is asked again from its byte 1000 on, once.
    start, end = spans[2]
    assert end - start + 1 > 1000 and spans.count((start + 1000, end)) == 1, spans
    assert (tmp_path / "out" / name).read_bytes() == (local / name).read_bytes()


def test_streamed_shards_are_resolved_once_and_read_from_their_storage_links(hub, pair, tmp_path, monkeypatch):
    """As on the Hub: resolve answers 302 to a signed storage link; the ranges go to the link, and a link that
    expires mid-merge (403) is resolved again."""
    _, lora, local = pair
    hub.cdn_links = True
    hub.expire_links_at = 8  # headers take two reads a shard (six), so the links expire among the tensor reads
    commit = hub.repos["org/base"].branches["main"]
    done = invoke("merge", "org/base", lora, tmp_path / "out", token=READ, monkeypatch=monkeypatch)
    assert done.exit_code == 0, done.output
    resolved = {}
    for name in shards(local):
        assert (tmp_path / "out" / name).read_bytes() == (local / name).read_bytes()
        assert not hub.file_gets(name)  # no range went through resolve
        resolved[name] = sum(r.method == "HEAD" and r.path.endswith(f"/resolve/{commit}/{name}") for r in hub.requests)
    # Once each, and once more for the links refused after they expired; at least one was.
    assert all(1 <= n <= 2 for n in resolved.values()) and sum(resolved.values()) > 3, resolved
    assert len(hub.cdn_gets()) >= 9 and hub.link_generation == 1


def test_connection_that_keeps_dropping_fails_cleanly_naming_the_file(hub, pair, tmp_path, monkeypatch):
    _, lora, local = pair
    name = shards(local)[1]
    hub.interrupt("org/base", name, [10**9, 10**9, 100] + [0] * 20)
    out = tmp_path / "out"
    done = invoke("merge", "org/base", lora, out, token=None, monkeypatch=monkeypatch)
    assert done.exit_code == 2, done.output
    assert "org/base@" in done.output and name in done.output and "kept dropping" in done.output
    assert "Traceback" not in done.output and not out.exists() and not list(tmp_path.glob(".out*"))


def test_streaming_a_private_base_without_a_token_says_to_log_in(hub, pair, tmp_path, monkeypatch):
    hub.repos["org/base"].private = True
    done = invoke("merge", "org/base", pair[1], tmp_path / "out", token=None, monkeypatch=monkeypatch)
    assert done.exit_code == 2 and "hf auth login" in done.output, done.output


def test_streaming_a_missing_repo_is_a_clear_404(hub, pair, tmp_path, monkeypatch):
    done = invoke("merge", "org/nope", pair[1], tmp_path / "out", token=None, monkeypatch=monkeypatch)
    assert done.exit_code == 2 and "org/nope: Hub repo not found" in done.output, done.output


# -- pushing -----------------------------------------------------------------------------------------------------


def test_push_lands_as_one_commit_with_the_card_and_leaves_nothing_local(hub, pair, tmp_path, monkeypatch):
    _, lora, local = pair
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", None)  # TMPDIR is read once, then cached
    args = ("merge", "org/base", lora, "--push-to-hub", "me/merged", "--verify", "--json")
    done = invoke(*args, monkeypatch=monkeypatch)
    assert done.exit_code == 0, done.output
    summary = json.loads(done.stdout)
    repo = hub.repos["me/merged"]
    assert repo.history == [("main", "Upload merged checkpoint with loractl")]  # one commit
    files = hub.files("me/merged")
    for name in shards(local):
        assert files[name] == (local / name).read_bytes()
    assert {"README.md", "BASE_README.md", "SHA256SUMS", "loractl.json", "config.json"} <= set(files)
    assert files["BASE_README.md"] == b"---\nlicense: apache-2.0\n---\n# The base's own card\n"
    meta = card_meta(files["README.md"])
    assert meta["base_model"] == "org/base" and meta["base_model_relation"] == "finetune"
    assert meta["library_name"] == "transformers" and "lora" in meta["tags"] and "loractl" in meta["tags"]
    card = files["README.md"].decode()
    assert str(lora) in card and "BASE_README.md" in card and "--push-to-hub me/merged" in card
    for name in shards(local):
        assert f"| {name} | `{sha(files[name])}` |" in card
    sums = dict(reversed(line.split("  ")) for line in files["SHA256SUMS"].decode().splitlines())
    assert all(sums[name] == sha(content) for name, content in files.items() if name in sums)
    assert set(sums) == set(files) - {".gitattributes", "SHA256SUMS"}
    assert [r.path for r in hub.requests if r.path == "/api/validate-yaml"]  # the card went through the Hub's check
    assert all("authorization" not in r.headers for r in hub.uploads())  # storage PUTs carry no token
    assert summary["push"]["commit"] == hub.repos["me/merged"].branches["main"]
    assert sorted(summary["push"]["uploaded"]) == shards(local)
    assert not any((tmp_path / "tmp").iterdir())  # the staging folder is gone


def test_streamed_push_keeps_at_most_one_shard_and_the_adapter_on_disk(hub, pair, tmp_path, monkeypatch):
    """Peak local disk, measured at the worst moment (each shard complete, before its upload) and by sampling."""
    _, lora, local = pair
    monkeypatch.setenv("HF_TOKEN", WRITE)
    cache, out = tmp_path / "hf", tmp_path / "out"
    peaks: list[int] = []

    class Measuring(HubPublisher):
        def shard_closed(self, path: Path) -> None:
            assert [p.name for p in path.parent.glob("*.safetensors")] == [path.name]
            peaks.append(disk_bytes(cache, path.parent, lora))
            super().shard_closed(path)

    sampled, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            sampled[0] = max([sampled[0]] + [disk_bytes(cache, d, lora) for d in tmp_path.glob(".out*")])
            time.sleep(0.001)

    publisher = Measuring(PushTarget("me/merged"))
    publisher.open()
    thread = threading.Thread(target=sample)
    thread.start()
    try:
        base = resolve("org/base", role="base", stream=True)
        summary = merge(base, [AdapterSpec(local_source(lora))], out, WriteOptions(publish=publisher))
    finally:
        stop.set()
        thread.join()
    largest = max((local / n).stat().st_size for n in shards(local))
    adapter = disk_bytes(lora)
    # Besides one shard and the adapter: the small files (configs, index, base card, the cache's file list).
    small = 8 * 1024
    assert len(peaks) == 3 and largest + adapter <= max(peaks) <= largest + adapter + small, peaks
    assert sampled[0] <= largest + adapter + small
    assert summary.push is not None and len(hub.repos["me/merged"].history) == 1
    assert shards(out) == []  # pushed and removed; OUT keeps the small files


def test_interrupted_push_leaves_no_commit_and_a_rerun_completes_it(hub, pair, tmp_path, monkeypatch):
    _, lora, local = pair
    hub.hold_uploads_after = 1  # the second shard's upload hangs: the run is killed there
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_TOKEN": WRITE,
        "HF_HUB_DISABLE_XET": "1",
        "TMPDIR": str(tmp_path),
    }
    args = [sys.executable, "-m", "lora_cli", "merge", "org/base", str(lora), "--push-to-hub", "me/merged"]
    proc = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert hub.uploads_held.wait(timeout=60), proc.communicate(timeout=5)[0]
    finally:
        proc.send_signal(signal.SIGKILL)  # a cancelled CI job: no chance to clean up
        proc.wait(timeout=30)
    hub.release_uploads()
    assert hub.repos["me/merged"].history == []
    assert set(hub.files("me/merged")) == {".gitattributes"}
    first_run = len(hub.uploads())
    stored_before = set(hub.repos["me/merged"].lfs)
    assert len(stored_before) == 1  # the first shard reached storage; the held one never did

    again = invoke("merge", "org/base", lora, "--push-to-hub", "me/merged", "--json", monkeypatch=monkeypatch)
    assert again.exit_code == 0, again.output
    assert sorted(json.loads(again.stdout)["push"]["uploaded"]) == shards(local)
    # The shard stored before the kill is not sent again: the LFS batch answered "already present".
    sent_again = {r.path.rsplit("/", 1)[1] for r in hub.uploads()[first_run:]}
    assert len(sent_again) == 2 and not sent_again & stored_before and len(hub.repos["me/merged"].lfs) == 3
    assert len(hub.repos["me/merged"].history) == 1
    files = hub.files("me/merged")
    assert all(files[name] == (local / name).read_bytes() for name in shards(local))


def test_push_without_a_token_says_to_log_in_with_write_access(hub, pair, tmp_path, monkeypatch):
    done = invoke("merge", "org/base", pair[1], "--push-to-hub", "me/merged", token=None, monkeypatch=monkeypatch)
    assert done.exit_code == 2, done.output
    assert "me/merged: the Hub refused the push with HTTP 401" in done.output and "write access" in done.output


def test_push_with_a_read_only_token_says_to_log_in_with_write_access(hub, pair, tmp_path, monkeypatch):
    hub.add_repo("me/merged", {".gitattributes": b""})
    done = invoke("merge", "org/base", pair[1], "--push-to-hub", "me/merged", token=READ, monkeypatch=monkeypatch)
    assert done.exit_code == 2, done.output
    assert "HTTP 403" in done.output and "write access" in done.output
    assert hub.repos["me/merged"].history == [] and not hub.uploads()


def test_repo_with_other_files_is_refused_unless_overwrite_which_removes_stale_shards(hub, pair, monkeypatch):
    _, lora, local = pair
    old = {"model-00001-of-00009.safetensors": b"old", "notes.txt": b"keep me"}
    hub.add_repo("me/merged", {".gitattributes": b"", **old})
    refused = invoke("merge", "org/base", lora, "--push-to-hub", "me/merged", monkeypatch=monkeypatch)
    assert refused.exit_code == 2 and "already holds files" in refused.output and "--overwrite" in refused.output
    assert not hub.uploads()
    done = invoke("merge", "org/base", lora, "--push-to-hub", "me/merged", "--overwrite", monkeypatch=monkeypatch)
    assert done.exit_code == 0, done.output
    files = hub.files("me/merged")
    assert "model-00001-of-00009.safetensors" not in files and files["notes.txt"] == b"keep me"
    assert set(shards(local)) <= set(files) and len(hub.repos["me/merged"].history) == 1


def test_push_to_a_branch_and_as_a_pull_request(hub, pair, tmp_path, monkeypatch):
    _, lora, local = pair
    args = ("merge", "org/base", lora, "--push-to-hub", "me/m", "--branch", "dev", "--private")
    done = invoke(*args, monkeypatch=monkeypatch)
    assert done.exit_code == 0, done.output
    assert hub.repos["me/m"].private
    assert set(shards(local)) <= set(hub.files("me/m", "dev")) and set(hub.files("me/m")) == {".gitattributes"}
    pr = invoke(
        "merge", "org/base", lora, "--push-to-hub", "me/m2", "--create-pr", "--commit-message", "Try it",
        "--out", tmp_path / "kept", "--keep-local", monkeypatch=monkeypatch,
    )  # fmt: skip
    assert pr.exit_code == 0, pr.output
    assert hub.repos["me/m2"].history == [("refs/pr/1", "Try it")] and set(hub.files("me/m2")) == {".gitattributes"}
    assert shards(tmp_path / "kept") == shards(local)  # --keep-local: the whole checkpoint stays in --out


def test_unmerge_streams_the_merged_checkpoint_and_pushes_too(hub, pair, tmp_path, monkeypatch):
    base, lora, local = pair
    hub.add_repo("me/merged-src", {p.name: p.read_bytes() for p in local.iterdir()})
    reference = tmp_path / "reference"
    done = invoke("unmerge", local, lora, reference, monkeypatch=monkeypatch)
    assert done.exit_code == 0, done.output
    done = invoke("unmerge", "me/merged-src", lora, "--push-to-hub", "me/back", monkeypatch=monkeypatch)
    assert done.exit_code == 0, done.output
    files = hub.files("me/back")
    assert all(files[name] == (reference / name).read_bytes() for name in shards(base))
    gets = [r for r in hub.file_gets(".safetensors") if "/me/merged-src/" in r.path]
    assert gets and all("range" in r.headers for r in gets)  # streamed, not downloaded
    assert "unmerged-adapter" in card_meta(files["README.md"])["tags"]


def test_a_folder_on_disk_is_pushed_by_the_library_in_one_commit(hub, pair, tmp_path, monkeypatch):
    _, _, local = pair
    monkeypatch.setenv("HF_TOKEN", WRITE)
    report = push_checkpoint(local, PushTarget("me/copy", keep_local=True, commit_message="Copy"))
    files = hub.files("me/copy")
    assert {p.name for p in local.iterdir()} <= set(files) and hub.repos["me/copy"].history == [("main", "Copy")]
    assert all(files[p.name] == p.read_bytes() for p in local.iterdir())
    assert sorted(report.uploaded) == shards(local) and shards(local) == sorted(report.uploaded)  # kept on disk


def test_the_ci_workflows_check_step_passes_and_catches_a_bad_shard(hub, pair, monkeypatch, capsys):
    """README's "Merge in CI" workflow ends with a script that compares the Hub's SHA-256 with SHA256SUMS: run it."""
    _, lora, local = pair
    readme = (REPO_ROOT / "README.md").read_text()
    workflow = readme[readme.index("## Merge in CI") :]
    start = workflow.index("python - <<'EOF'\n") + len("python - <<'EOF'\n")
    script = textwrap.dedent(workflow[start : workflow.index("\n          EOF", start)])
    done = invoke("merge", "org/base", lora, "--push-to-hub", "me/ci", "--verify", monkeypatch=monkeypatch)
    assert done.exit_code == 0, done.output
    monkeypatch.setenv("TARGET", "me/ci")
    exec(compile(script, "README.md", "exec"), {})
    assert "me/ci: 3 shards on the Hub match SHA256SUMS" in capsys.readouterr().out
    repo = hub.repos["me/ci"]  # a shard whose bytes on the Hub are not the verified ones
    repo.commits[repo.branches["main"]][shards(local)[0]] = b"not the verified bytes"
    with pytest.raises(SystemExit, match="differs from SHA256SUMS"):
        exec(compile(script, "README.md", "exec"), {})


def test_offline_a_cached_base_is_read_from_the_cache(hub, pair, tmp_path, monkeypatch):
    _, lora, local = pair
    first = invoke("merge", "org/base", lora, tmp_path / "a", "--download", token=None, monkeypatch=monkeypatch)
    assert first.exit_code == 0, first.output
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    before = len(hub.requests)
    again = invoke("merge", "org/base", lora, tmp_path / "b", token=None, monkeypatch=monkeypatch)
    assert again.exit_code == 0, again.output
    assert len(hub.requests) == before  # not one request
    assert all((tmp_path / "b" / n).read_bytes() == (local / n).read_bytes() for n in shards(local))
