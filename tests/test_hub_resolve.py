"""resolve(): local folders pass through; Hub repo ids go through the real huggingface_hub client to a fake Hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import constants, file_download
from huggingface_hub.utils._http import close_session

from lora_cli.errors import InputError
from lora_cli.resolve import ResolvedSource, resolve
from tests.hub_server import FakeHub

REPO_ROOT = Path(__file__).resolve().parents[1]

INDEX = {
    "metadata": {"total_size": 2048},
    "weight_map": {
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
        "lm_head.weight": "model-00002-of-00002.safetensors",
    },
}
BASE_FILES = {
    "config.json": b'{"model_type": "llama"}',
    # Distinct contents: the cache stores identical files once, so twins would be downloaded only once.
    "generation_config.json": b'{"do_sample": false}',
    "tokenizer_config.json": b'{"model_max_length": 4096}',
    "special_tokens_map.json": b'{"bos_token": "<s>"}',
    "tokenizer.json": b'{"version": "1.0"}',
    "tokenizer.model": b"sentencepiece",
    "chat_template.jinja": b"{{ messages }}",
    "model.safetensors.index.json": json.dumps(INDEX).encode(),
    "model-00001-of-00002.safetensors": bytes(range(256)) * 4,
    "model-00002-of-00002.safetensors": bytes(reversed(range(256))) * 4,
    # Never wanted: pickles, a duplicate weight file the index does not name, subfolders, docs.
    "pytorch_model.bin": b"pickle" * 100,
    "consolidated.safetensors": b"dup" * 100,
    "original/consolidated.00.pth": b"pickle",
    "onnx/model.safetensors": b"other",
    "README.md": b"# base",
}
BASE_WANTED = {
    "config.json",
    "generation_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "chat_template.jinja",
    "model.safetensors.index.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "README.md",  # the base's card, kept as BASE_README.md beside the merge's own
}
ADAPTER_CONFIG = b'{"peft_type": "LORA", "r": 8}'
LORA_FILES = {"adapter_config.json": ADAPTER_CONFIG, "adapter_model.safetensors": b"s"}
SHARD = "model-00001-of-00002.safetensors"


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A running fake Hub with the client pointed at it and an isolated cache; nothing else is touched."""
    server = FakeHub()
    server.start()
    # huggingface_hub reads these from the environment at import time, so patch the module constants.
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    template = server.url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf" / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    # The client waits 1 s before resuming a dropped download; the only use of `time` in that module.
    monkeypatch.setattr(file_download, "time", SimpleNamespace(sleep=lambda _seconds: None))
    close_session()
    try:
        yield server
    finally:
        close_session()
        server.stop()


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


# -- local references --------------------------------------------------------------------------------------------


def test_local_folder_passes_through(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    got = resolve(str(tmp_path), role="base")
    assert got == ResolvedSource(ref=str(tmp_path), path=tmp_path.resolve(), revision=None, commit=None, is_local=True)


def test_missing_local_path_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such folder"):
        resolve(str(tmp_path / "nope"), role="adapter")
    with pytest.raises(InputError, match="no such folder"):
        resolve("./surely/not/here", role="base")


def test_local_file_is_not_a_folder(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(InputError, match="not a folder"):
        resolve(str(tmp_path / "model.safetensors"), role="base")


def test_revision_with_local_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="--revision applies to Hub repo ids") as err:
        resolve(str(tmp_path), role="base", revision="main")
    assert str(tmp_path) in str(err.value)


@pytest.mark.parametrize("ref", ["org/name/extra", "bad--name", "org/-x", "a" * 200])
def test_bad_repo_id_is_an_input_error(ref: str) -> None:
    with pytest.raises(InputError, match="neither an existing folder nor a valid Hugging Face repo id"):
        resolve(ref, role="base")


# -- downloads ---------------------------------------------------------------------------------------------------


def test_base_fetches_configs_index_shards_tokenizer_and_no_pickles(hub: FakeHub) -> None:
    sha = hub.add_repo("org/base", BASE_FILES)["main"]
    got = resolve("org/base", role="base")
    assert got.is_local is False and got.ref == "org/base" and got.revision is None
    assert got.commit == sha and got.path.name == sha
    assert _files(got.path) == BASE_WANTED
    for name in BASE_WANTED:
        assert (got.path / name).read_bytes() == BASE_FILES[name]
    assert hub.fetched() == BASE_WANTED  # never even requested, not merely filtered out afterwards


def test_base_without_index_fetches_its_single_safetensors(hub: FakeHub) -> None:
    hub.add_repo("single", {"config.json": b"{}", "model.safetensors": b"w" * 64, "pytorch_model.bin": b"p"})
    got = resolve("single", role="checkpoint")
    assert _files(got.path) == {"config.json", "model.safetensors"}
    assert "pytorch_model.bin" not in hub.fetched()


def test_base_with_only_pickles_is_refused(hub: FakeHub) -> None:
    hub.add_repo("org/old", {"config.json": b"{}", "pytorch_model.bin": b"p" * 64})
    with pytest.raises(InputError, match=r"no \.safetensors weights") as err:
        resolve("org/old", role="base")
    assert "org/old" in str(err.value)
    assert "pytorch_model.bin" not in hub.fetched()


def test_adapter_with_safetensors_never_fetches_the_bin(hub: FakeHub) -> None:
    files = {
        "adapter_config.json": ADAPTER_CONFIG,
        "adapter_model.safetensors": b"s" * 64,
        "adapter_model.bin": b"p" * 64,
        "README.md": b"card",
    }
    sha = hub.add_repo("org/lora", files)["main"]
    got = resolve("org/lora", role="adapter")
    assert got.commit == sha
    assert _files(got.path) == {"adapter_config.json", "adapter_model.safetensors"}
    assert hub.fetched() == {"adapter_config.json", "adapter_model.safetensors"}


def test_adapter_with_only_a_bin_fetches_the_bin(hub: FakeHub) -> None:
    hub.add_repo("org/old-lora", {"adapter_config.json": ADAPTER_CONFIG, "adapter_model.bin": b"p" * 64})
    got = resolve("org/old-lora", role="adapter")
    assert _files(got.path) == {"adapter_config.json", "adapter_model.bin"}
    assert (got.path / "adapter_model.bin").read_bytes() == b"p" * 64


def test_repo_without_adapter_config_is_not_an_adapter(hub: FakeHub) -> None:
    hub.add_repo("org/base", BASE_FILES)
    with pytest.raises(InputError, match=r"no adapter_config\.json .* not a PEFT adapter"):
        resolve("org/base", role="adapter")


def test_revision_branch_and_commit(hub: FakeHub) -> None:
    v1 = {"adapter_config.json": ADAPTER_CONFIG, "adapter_model.safetensors": b"one" * 10}
    v2 = {"adapter_config.json": ADAPTER_CONFIG, "adapter_model.safetensors": b"two" * 10}
    shas = hub.add_repo("org/lora", branches={"main": v1, "v2": v2})

    by_branch = resolve("org/lora", role="adapter", revision="v2")
    assert by_branch.revision == "v2" and by_branch.commit == shas["v2"]
    assert (by_branch.path / "adapter_model.safetensors").read_bytes() == b"two" * 10

    by_commit = resolve("org/lora", role="adapter", revision=shas["main"])
    assert by_commit.revision == shas["main"] and by_commit.commit == shas["main"]
    assert (by_commit.path / "adapter_model.safetensors").read_bytes() == b"one" * 10

    default = resolve("org/lora", role="adapter")
    assert default.commit == shas["main"] and default.path == by_commit.path


def test_unknown_revision_names_it(hub: FakeHub) -> None:
    hub.add_repo("org/lora", LORA_FILES)
    with pytest.raises(InputError, match="revision 'nope' not found") as err:
        resolve("org/lora", role="adapter", revision="nope")
    assert "org/lora" in str(err.value) and "--revision" in str(err.value)


# -- errors from the Hub -----------------------------------------------------------------------------------------


def test_missing_repo_is_a_clear_input_error(hub: FakeHub) -> None:
    with pytest.raises(InputError) as err:
        resolve("org/missing", role="base")
    line = str(err.value)
    assert "\n" not in line
    assert line.startswith("org/missing: Hub repo not found")
    assert "check the repo id" in line and "hf auth login" in line
    with pytest.raises(InputError, match=r"^mymodel: no such folder, and as a Hub repo id: Hub repo not found"):
        resolve("mymodel", role="base")


def test_private_repo_without_token_says_to_log_in(hub: FakeHub) -> None:
    hub.add_repo("org/private", LORA_FILES, private=True)
    with pytest.raises(InputError) as err:
        resolve("org/private", role="adapter")
    line = str(err.value)
    assert "org/private" in line and "not logged in" in line
    assert "hf auth login" in line and "HF_TOKEN" in line


def test_hf_token_from_env_is_sent_and_accepted(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.add_repo("org/private", LORA_FILES, private=True)
    hub.tokens.add("hf_good")
    monkeypatch.setenv("HF_TOKEN", "hf_good")
    got = resolve("org/private", role="adapter")
    assert (got.path / "adapter_model.safetensors").read_bytes() == b"s"
    assert hub.requests and all(r.headers.get("authorization") == "Bearer hf_good" for r in hub.requests)


def test_wrong_token_says_to_log_in(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.add_repo("org/private", LORA_FILES, private=True)
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(InputError, match=r"refused access with HTTP 401: .*hf auth login"):
        resolve("org/private", role="adapter")


def test_gated_repo_says_to_log_in_and_accept_terms(hub: FakeHub) -> None:
    hub.add_repo("org/gated", BASE_FILES, gated=True)
    with pytest.raises(InputError, match="gated") as err:
        resolve("org/gated", role="base")
    assert "hf auth login" in str(err.value) and "accept the model's terms" in str(err.value)


def test_unreachable_hub_is_a_clear_input_error(hub: FakeHub) -> None:
    hub.add_repo("org/base", BASE_FILES)
    hub.stop()  # connection refused from now on
    with pytest.raises(
        InputError,
        match=r"not in the local Hugging Face cache, or only partly, and the Hub at http://127\.0\.0\.1:\d+ cannot",
    ):
        resolve("org/base", role="base")


# -- interrupted downloads ---------------------------------------------------------------------------------------


def test_dropped_connection_is_resumed_with_a_range_request(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    # The client writes in chunks of DOWNLOAD_CHUNK_SIZE (10 MB); shrink them so bytes land on disk before the drop.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64)
    hub.add_repo("org/base", BASE_FILES)
    hub.interrupt("org/base", SHARD, [300])
    got = resolve("org/base", role="base")
    assert (got.path / SHARD).read_bytes() == BASE_FILES[SHARD]
    gets = hub.file_gets(SHARD)
    assert len(gets) == 2
    assert "range" not in gets[0].headers
    resumed_at = int(gets[1].headers["range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= 300  # what was on disk, not the whole file again


def test_download_that_keeps_failing_is_reported_and_a_rerun_completes_it(hub: FakeHub) -> None:
    hub.add_repo("org/base", BASE_FILES)
    hub.interrupt("org/base", SHARD, [100] + [0] * 20)  # the client gives up after 5 retries without progress
    with pytest.raises(InputError) as err:
        resolve("org/base", role="base")
    line = str(err.value)
    assert line.startswith("org/base: the download was interrupted")
    assert "re-run the command to resume" in line and "\n" not in line

    hub.interrupt("org/base", SHARD, [])
    configs_fetched = len(hub.file_gets("config.json"))
    got = resolve("org/base", role="base")
    assert (got.path / SHARD).read_bytes() == BASE_FILES[SHARD]
    assert _files(got.path) == BASE_WANTED
    assert len(hub.file_gets("config.json")) == configs_fetched  # finished files came from the cache


# -- offline mode ------------------------------------------------------------------------------------------------


def test_offline_uses_the_cache_only(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    main = {"adapter_config.json": ADAPTER_CONFIG, "adapter_model.bin": b"p"}
    v2 = {"adapter_config.json": ADAPTER_CONFIG, "adapter_model.bin": b"q"}
    shas = hub.add_repo("org/lora", branches={"main": main, "v2": v2})
    hub.add_repo("org/base", BASE_FILES)
    online = [resolve("org/base", role="base"), resolve("org/lora", role="adapter", revision="v2")]

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    seen = len(hub.requests)
    offline = [resolve("org/base", role="base"), resolve("org/lora", role="adapter", revision="v2")]
    assert offline == online
    assert offline[1].commit == shas["v2"] and _files(offline[0].path) == BASE_WANTED
    assert len(hub.requests) == seen  # not one request while offline

    with pytest.raises(InputError) as err:
        resolve("org/lora", role="adapter")  # main was never downloaded
    line = str(err.value)
    assert "not in the local Hugging Face cache, or only partly, and HF_HUB_OFFLINE is set" in line
    assert "org/lora" in line and "pass a local folder" in line
    with pytest.raises(InputError, match="HF_HUB_OFFLINE is set"):
        resolve("org/never-seen", role="base")

    (offline[0].path / SHARD).unlink()  # as if that file's download had never finished
    with pytest.raises(InputError, match=r"or only partly, and HF_HUB_OFFLINE is set"):
        resolve("org/base", role="base")
    assert len(hub.requests) == seen


# -- the real environment variables, in a fresh interpreter -----------------------------------------------------

_SCRIPT = (
    "import json; from lora_cli.resolve import resolve; from lora_cli.errors import InputError\n"
    "try:\n"
    "    r = resolve('org/private', role='adapter')\n"
    "    print(json.dumps({'path': str(r.path), 'commit': r.commit}))\n"
    "except InputError as e:\n"
    "    print(json.dumps({'error': str(e)}))\n"
)


def test_env_vars_drive_the_client_in_a_fresh_process(tmp_path: Path) -> None:
    """HF_ENDPOINT, HF_HOME, HF_TOKEN and HF_HUB_OFFLINE as a user sets them, no monkeypatching."""
    fake = FakeHub()
    sha = fake.add_repo("org/private", LORA_FILES, private=True)["main"]
    fake.tokens.add("hf_env")
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}

    def run(endpoint: str, **env: str) -> dict[str, str]:
        full = {**keep, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO_ROOT), **env}
        done = subprocess.run([sys.executable, "-c", _SCRIPT], env=full, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])

    with fake.running():
        url = fake.url
        assert "not logged in" in run(url)["error"]
        online = run(url, HF_TOKEN="hf_env")
        assert online["commit"] == sha
        assert Path(online["path"]).is_relative_to(tmp_path / "hf" / "hub")
    assert run(url, HF_HUB_OFFLINE="1") == online  # server is gone: the cache alone answers
