"""Every command against every broken or hostile input: one line naming the file and the fix, exit 2, no traceback,
nothing written, inputs byte-identical, and no pickled code run.

Commands are parametrised; one not yet registered in the app is skipped (so the corpus runs as commands land).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file
from typer.testing import CliRunner

from lora_cli.cli.app import app
from tests.builders import make_adapter, save_base, tiny_gpt2, tiny_llama
from tests.corrupt_inputs import CASES, Case, Inputs, Pristine, hostile_pickle

runner = CliRunner()
FACTORY = functools.partial(tiny_llama, torch.float32)
LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
# "path: what is wrong (what to do)": a message that names no fix ends without the parenthesis.
ONE_LINE_WITH_FIX = re.compile(r"^error: .+ \(.+\)$")

Args = Callable[[Inputs, Pristine], list[object]]
# unmerge gets the (broken) base as MERGED, diff compares it with the good merge: each must stop at the breakage.
COMMANDS: dict[str, Args] = {
    "merge": lambda i, p: ["merge", i.base, i.adapter, i.out],
    "unmerge": lambda i, p: ["unmerge", i.base, i.adapter, i.out],
    "diff": lambda i, p: ["diff", i.base, p.merged, "--adapter", i.adapter],
    "inspect": lambda i, p: ["inspect", i.adapter, "--base", i.base],
    "memory": lambda i, p: ["memory", i.base, i.adapter],
}
WRITES_OUT = {"merge", "unmerge"}
READS_VALUES = {"merge", "unmerge", "diff", "inspect"}


def registered() -> set[str]:
    return {c.name or c.callback.__name__ for c in app.registered_commands}


def commands() -> list:
    """Each command as a parameter, skipped (before any fixture is built) while it is not registered."""
    have = registered()
    return [
        pytest.param(name, marks=pytest.mark.skipif(name not in have, reason=f"`loractl {name}` is not registered yet"))
        for name in COMMANDS
    ]


def invoke(args: list[object]):
    return runner.invoke(app, [str(a) for a in args])


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under `root`: file contents by hash, symlinks by target (not followed), folders by name."""
    entries: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                entries[rel] = "link:" + os.readlink(path)
            elif path.is_file():
                entries[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                entries[rel] = "dir"
    return entries


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Pristine:
    root = tmp_path_factory.mktemp("pristine")
    save_base(FACTORY(), root / "base", max_shard_size="40KB")
    assert len(list((root / "base").glob("model-*.safetensors"))) >= 3  # the index cases need several shards
    make_adapter(FACTORY, LORA, root / "lora")
    make_adapter(functools.partial(tiny_gpt2, torch.float32), LoraConfig(r=4, target_modules=["c_attn"]), root / "gpt2")
    wide = functools.partial(tiny_llama, torch.float32, hidden_size=48)
    make_adapter(wide, LORA, root / "wide")
    result = invoke(["merge", root / "base", root / "lora", root / "merged", "--quiet"])
    assert result.exit_code == 0, result.output
    return Pristine(root / "base", root / "lora", root / "gpt2", root / "wide", root / "merged")


@pytest.mark.parametrize("command", commands())
def test_pristine_inputs_succeed(command: str, pristine: Pristine, tmp_path: Path) -> None:
    """The control: each command accepts the unbroken inputs, so a failure below is the breakage's doing."""
    base = pristine.merged if command == "unmerge" else pristine.base
    inputs = Inputs(base, pristine.adapter, tmp_path / "out", "")
    result = invoke([*COMMANDS[command](inputs, pristine), "--quiet"])
    assert result.exit_code == 0, result.output


def applicable(command: str, case: Case) -> bool:
    """Broken OUT paths and side files (copied into OUT) concern only commands that write; broken tensor values
    only commands that read them (memory reads headers only)."""
    if case.kind in ("output", "side_file"):
        return command in WRITES_OUT
    return case.kind != "values" or command in READS_VALUES


def pairs() -> list:
    have = registered()
    return [
        pytest.param(
            command,
            case,
            id=f"{command}-{case.name}",
            marks=pytest.mark.skipif(command not in have, reason=f"`loractl {command}` is not registered yet"),
        )
        for command in COMMANDS
        for case in CASES
        if applicable(command, case)
    ]


@pytest.mark.parametrize(("command", "case"), pairs())
def test_bad_input_is_one_line_exit_2_and_harmless(command: str, case: Case, pristine: Pristine, tmp_path) -> None:
    root = tmp_path / "case"
    root.mkdir()
    inputs = case.build(root, pristine)
    before = snapshot(root)

    result = invoke(COMMANDS[command](inputs, pristine))

    message = result.output.strip()
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.output}"
    assert "Traceback" not in result.output and "\x1b" not in result.output  # no terminal escapes either
    assert len(message.splitlines()) == 1, message
    assert ONE_LINE_WITH_FIX.match(message), f"no fix in: {message}"
    assert inputs.culprit in message, f"{inputs.culprit!r} not named in: {message}"
    # Nothing written, nothing changed: not OUT, not a temporary sibling, not a byte of any input.
    assert snapshot(root) == before
    assert not list(root.rglob("*.loractl-tmp-*"))
    if inputs.marker is not None:
        assert not inputs.marker.exists(), "the pickle's code ran"


def test_hostile_pickle_really_runs_code_when_unpickled(tmp_path: Path) -> None:
    """The control for the pickle cases: unpickled the unsafe way, the fixture does create its marker."""
    marker = tmp_path / "ran"
    hostile_pickle(tmp_path / "evil.bin", marker)
    torch.load(tmp_path / "evil.bin", weights_only=False)
    assert marker.exists()


def test_plain_pickle_adapter_still_merges(pristine: Pristine, tmp_path: Path) -> None:
    """The control for `hostile_adapter_bin`: an old-style adapter_model.bin of plain tensors is accepted."""
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_bytes((pristine.adapter / "adapter_config.json").read_bytes())
    torch.save(load_file(pristine.adapter / "adapter_model.safetensors"), lora / "adapter_model.bin")
    result = invoke(["merge", pristine.base, lora, tmp_path / "out", "--quiet"])
    assert result.exit_code == 0, result.output
    # The same merged weights as from the safetensors adapter, byte for byte.
    shards = sorted(p.name for p in pristine.merged.glob("*.safetensors"))
    assert all((tmp_path / "out" / n).read_bytes() == (pristine.merged / n).read_bytes() for n in shards)


def test_symlinked_out_parent_is_followed(pristine: Pristine, tmp_path: Path) -> None:
    """A parent folder reached through a symlink (as /tmp is on macOS) is a normal place to write to."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    result = invoke(["merge", pristine.base, pristine.adapter, tmp_path / "link" / "out", "--quiet"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "link").is_symlink()
    assert (real / "out" / "loractl.json").is_file()
    assert sorted(p.name for p in real.iterdir()) == ["out"]


# ---------------------------------------------------------------- issue 17: what the new refusals must still accept


def _merged_shards_equal(out: Path, reference: Path) -> bool:
    shards = sorted(p.name for p in reference.glob("*.safetensors"))
    return bool(shards) and all((out / n).read_bytes() == (reference / n).read_bytes() for n in shards)


def test_hub_cache_snapshot_links_are_followed(pristine: Pristine, tmp_path: Path) -> None:
    """huggingface_hub's cache: `snapshots/<commit>/<file>` links to `../../blobs/<hash>`, outside the snapshot
    folder but inside the repo's cache folder. Those side files are followed and copied as regular files."""
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot_dir = repo / "snapshots" / ("c" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot_dir.mkdir(parents=True)
    for path in pristine.base.iterdir():
        blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        blob.write_bytes(path.read_bytes())
        (snapshot_dir / path.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    out = tmp_path / "out"
    result = invoke(["merge", snapshot_dir, pristine.adapter, out, "--quiet"])
    assert result.exit_code == 0, result.output
    assert _merged_shards_equal(out, pristine.merged)
    config = out / "config.json"
    assert config.is_file() and not config.is_symlink()


def test_legacy_pickle_adapter_merges(pristine: Pristine, tmp_path: Path) -> None:
    """An adapter_model.bin in torch's pre-1.6 format (not a zip), as old PEFT versions saved it, was called
    "corrupt": `mmap=True` refuses that format. It is read whole instead, still with weights_only=True."""
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_bytes((pristine.adapter / "adapter_config.json").read_bytes())
    tensors = load_file(pristine.adapter / "adapter_model.safetensors")
    torch.save(tensors, lora / "adapter_model.bin", _use_new_zipfile_serialization=False)
    assert not (lora / "adapter_model.bin").read_bytes().startswith(b"PK")
    result = invoke(["merge", pristine.base, lora, tmp_path / "out", "--quiet"])
    assert result.exit_code == 0, result.output
    assert _merged_shards_equal(tmp_path / "out", pristine.merged)


def test_empty_adapter_goes_on_with_allow_empty(pristine: Pristine, tmp_path: Path) -> None:
    """The empty adapter every command refuses (corpus case `adapter_bin_empty`) is accepted with --allow-empty:
    it changes nothing."""
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_bytes((pristine.adapter / "adapter_config.json").read_bytes())
    torch.save({}, lora / "adapter_model.bin")
    out = tmp_path / "out"
    for args in (
        ["merge", pristine.base, lora, out, "--json"],
        ["inspect", lora, "--base", pristine.base, "--quiet"],
        ["memory", pristine.base, lora, "--quiet"],
    ):
        refused = invoke(args)
        assert refused.exit_code == 2 and "--allow-empty" in refused.output, refused.output
        allowed = invoke([*args, "--allow-empty"])
        assert allowed.exit_code == 0, allowed.output
    assert (
        json.loads(invoke(["merge", pristine.base, lora, tmp_path / "o2", "--json", "--allow-empty"]).output)[
            "tensors_edited"
        ]
        == 0
    )
    diff = invoke(["diff", pristine.base, out, "--adapter", lora, "--allow-empty", "--quiet"])
    assert diff.exit_code == 0, diff.output


def test_config_regexes_are_matched_with_a_bounded_engine(pristine: Pristine, tmp_path: Path) -> None:
    """The probe's pattern `(.*.*)*Z` hung every command under `re`; the bounded engine settles it at once (it
    matches nothing, so the merge is the plain one). Regex target_modules/exclude_modules are not matched by
    loractl (the saved weights say which modules are adapted), so they cannot stall it either."""
    lora = Path(shutil.copytree(pristine.adapter, tmp_path / "lora"))
    config = json.loads((lora / "adapter_config.json").read_text())
    config.update(
        rank_pattern={"(.*.*)*Z": 4},
        alpha_pattern={"(.*.*)*Z": 4},
        target_modules="(.*.*)*Z|.*(q|v)_proj",
        exclude_modules="(.*.*)*Z",
    )
    (lora / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    for command in COMMANDS:
        base = pristine.merged if command == "unmerge" else pristine.base
        inputs = Inputs(base, lora, tmp_path / f"out-{command}", "")
        started = time.monotonic()
        result = invoke([*COMMANDS[command](inputs, pristine), "--quiet"])
        assert result.exit_code == 0, f"{command}: {result.output}"
        assert time.monotonic() - started < 30, f"{command} took {time.monotonic() - started:.1f} s"
    out = tmp_path / "out-merge"
    assert _merged_shards_equal(out, pristine.merged)


def test_broken_provenance_record_is_ignored(pristine: Pristine, tmp_path: Path) -> None:
    """loractl.json only describes a checkpoint: nested 5,000 deep (a RecursionError in Python's parser, once an
    internal error) or a named pipe, it is left out of inspect's and diff's reports, never a crash or a hang."""
    for name, spoil in {
        "deep": lambda p: p.write_text('{"tool": ' + "[" * 5000 + "]" * 5000 + "}"),
        "fifo": lambda p: (p.unlink(), os.mkfifo(p)),
    }.items():
        merged = Path(shutil.copytree(pristine.merged, tmp_path / name))
        spoil(merged / "loractl.json")
        for args in (["inspect", merged], ["diff", pristine.base, merged]):
            result = invoke([*args, "--quiet"])
            assert result.exit_code in (0, 1), f"{name} {args[0]}: {result.output}"
            assert "internal error" not in result.output and "Traceback" not in result.output
