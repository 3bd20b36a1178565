"""Faults during a merge: signals at random points, a full disk, an unwritable OUT parent, and `--verify`.

The promise under test: OUT appears complete and valid, or not at all, with no temporary folder left behind.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file
from typer.testing import CliRunner

import lora_cli.io.writer as writer_module
from lora_cli.cli.app import app
from lora_cli.io.atomic import TMP_MARKER
from lora_cli.verify import MANIFEST
from tests.builders import make_adapter, save_base, tiny_llama

runner = CliRunner()
# Large enough (about 17 MB, 28 LoRA-edited matrices) that writing takes a measurable while, so a signal sent
# after the temporary folder appears lands in the middle of the work, not after it.
BIG = functools.partial(
    tiny_llama,
    torch.float32,
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=8,
)
ALL_LINEAR = LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False)


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def snapshot(*folders: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest() for f in folders for p in sorted(f.rglob("*")) if p.is_file()
    }


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if TMP_MARKER in p.name or ".loractl-old-" in p.name]


def assert_valid_merge(out: Path, reference: Path) -> None:
    """A complete OUT: every tensor of the reference merge, bit for bit."""
    expected = {}
    for shard in sorted(reference.glob("*.safetensors")):
        expected.update(load_file(shard))
    got = {}
    for shard in sorted(out.glob("*.safetensors")):
        got.update(load_file(shard))
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert (out / "loractl.json").is_file()


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("big")
    save_base(BIG(), root / "base", max_shard_size="6MB")
    make_adapter(BIG, ALL_LINEAR, root / "lora")
    result = invoke("merge", root / "base", root / "lora", root / "reference", "--quiet", "--device", "cpu")
    assert result.exit_code == 0, result.output
    return root / "base", root / "lora", root / "reference"


# ---------------------------------------------------------------- signals


def _merge_process(base: Path, lora: Path, out: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "lora_cli", "merge", base, lora, out, "--device", "cpu", "--quiet"]
    return subprocess.Popen([str(c) for c in command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_work(process: subprocess.Popen, parent: Path, timeout: float = 60.0) -> bool:
    """Block until the merge has started writing (its temporary folder exists); False if it ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(TMP_MARKER in p.name for p in parent.iterdir()):
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.001)
    raise AssertionError("the merge never started writing")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_at_random_point_leaves_nothing_or_a_complete_out(signum, big, tmp_path) -> None:
    base, lora, reference = big
    before = snapshot(base, lora)
    rng = random.Random(f"{signum}")  # reproducible delays; the printed outcome says which one failed
    # Delays are drawn within how long the streaming part takes on this machine, so that they land inside it
    # however fast the merge is; the first signal goes out as soon as the temporary folder appears.
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    process = _merge_process(base, lora, calibration / "out")
    assert _wait_for_work(process, calibration)
    began = time.monotonic()
    process.communicate(timeout=60)
    window = time.monotonic() - began
    outcomes = []
    interrupted = 0
    for attempt in range(4):
        parent = tmp_path / f"run{attempt}"
        parent.mkdir()
        out = parent / "out"
        process = _merge_process(base, lora, out)
        started = _wait_for_work(process, parent)
        delay = 0.0 if attempt == 0 else rng.uniform(0.0, 0.8 * window)
        if started:
            time.sleep(delay)
            process.send_signal(signum)
        _, stderr = process.communicate(timeout=60)
        outcome = f"attempt {attempt}: delay {delay:.3f}s exit {process.returncode}: {stderr.strip()}"
        outcomes.append(outcome)
        assert "Traceback" not in stderr, outcome
        assert not leftovers(parent), outcome
        if process.returncode == 130 and not out.exists():
            assert stderr.strip() == "interrupted: no partial output was left behind", outcome
            interrupted += 1
            continue
        # Any other outcome means the signal landed once the work was done: exit 0; 130 just after the rename;
        # click's "Aborted!" (1) or death by the signal (-signum) after the command returned, while the
        # interpreter shuts down. In every case OUT must be the complete merge.
        assert process.returncode in (0, 130, 1, -signum), outcome
        if process.returncode == 1:
            assert stderr.strip() == "Aborted!", outcome
        assert_valid_merge(out, reference)
    assert snapshot(base, lora) == before
    # At least one run must really have been cut short, or the test proved nothing.
    assert interrupted >= 1, "\n".join(outcomes)


# ---------------------------------------------------------------- a full disk


def _is_ours(fd: int) -> bool:
    try:
        return TMP_MARKER in os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return False


@pytest.mark.parametrize("call", ["write", "copy_file_range", "fsync"])
def test_full_disk_is_a_clear_error_and_cleans_up(call, big, tmp_path, monkeypatch) -> None:
    """The Nth write into OUT fails with ENOSPC, as on a full disk: one line, exit 2, nothing left behind.

    fsync too: a filesystem that delays allocation reports the full disk only when the data is flushed, which
    happens in the background thread that syncs finished shards.
    """
    base, lora, _ = big
    before = snapshot(base, lora)
    real = getattr(os, call)
    calls = {"n": 0}

    def full(*args, **kwargs):
        target = args[1] if call == "copy_file_range" else args[0]
        if _is_ours(target):
            calls["n"] += 1
            if calls["n"] > 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    monkeypatch.setattr(writer_module.os, call, full)
    out = tmp_path / "out"
    result = invoke("merge", base, lora, out, "--device", "cpu")
    assert calls["n"] > 3, "the fault was never injected"
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.output.strip().startswith("error: ") and len(result.output.strip().splitlines()) == 1
    assert "no space left on the device" in result.output and "free disk space" in result.output
    assert not out.exists() and not leftovers(tmp_path)
    assert snapshot(base, lora) == before


def test_unwritable_out_parent_fails_before_any_work(big, tmp_path, monkeypatch) -> None:
    base, lora, _ = big
    if os.geteuid() == 0:
        # Permission bits do not bind root; sysfs refuses to create folders for anyone.
        parent = Path("/sys")
    else:
        parent = tmp_path / "read-only"
        parent.mkdir()
        parent.chmod(0o555)
    started = []
    monkeypatch.setattr("lora_cli.engine.Pipeline.run", lambda self, jobs: started.append(1))
    out = parent / "loractl-test-out"
    result = invoke("merge", base, lora, out)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert "is not writable" in result.output and str(out) in result.output
    assert not started, "tensors were streamed before the output was checked"
    assert not out.exists() and not leftovers(parent)


# ---------------------------------------------------------------- --verify and the manifest


def test_verify_checks_every_tensor_and_writes_a_manifest(big, tmp_path) -> None:
    base, lora, reference = big
    out = tmp_path / "out"
    result = invoke("merge", base, lora, out, "--verify", "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n_tensors = sum(len(load_file(out / s)) for s in shards)
    assert summary["verification"]["tensors"] == n_tensors and summary["verification"]["files"] == len(shards)
    assert_valid_merge(out, reference)
    # SHA256SUMS lists every other file with its real hash, in `sha256sum -c` format.
    listed = dict(reversed(line.split("  ", 1)) for line in (out / MANIFEST).read_text().splitlines())
    assert sorted(listed) == sorted(p.name for p in out.iterdir() if p.name != MANIFEST)
    assert all(hashlib.sha256((out / n).read_bytes()).hexdigest() == h for n, h in listed.items())
    human = invoke("merge", base, lora, tmp_path / "out2", "--verify", "--device", "cpu")
    assert f"{n_tensors} tensors, {len(shards)} files" in human.output


def test_verify_command_accepts_intact_and_names_an_altered_file(big, tmp_path) -> None:
    base, lora, reference = big
    unverified = invoke("verify", reference)  # merged without --verify: no manifest to check
    assert unverified.exit_code == 2 and "has no SHA256SUMS" in unverified.output, unverified.output
    out = tmp_path / "out"
    assert invoke("merge", base, lora, out, "--verify", "--quiet", "--device", "cpu").exit_code == 0
    ok = invoke("verify", out)
    assert ok.exit_code == 0 and "verified" in ok.output, ok.output
    shard = sorted(out.glob("*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    bad = invoke("verify", out)
    assert bad.exit_code == 2 and shard.name in bad.output and "SHA-256" in bad.output, bad.output
    assert "Traceback" not in bad.output
    shard.unlink()
    missing = invoke("verify", out)
    assert missing.exit_code == 2 and f"{shard.name} is missing" in missing.output, missing.output


@pytest.mark.parametrize("where", ["computed", "copied"])
def test_verify_catches_bytes_that_reach_the_disk_wrong(where, big, tmp_path, monkeypatch) -> None:
    """A write that lands different bytes (a bad disk, a buggy filesystem) fails --verify and leaves no OUT."""
    base, lora, _ = big
    if where == "computed":
        real_write = writer_module._write_all

        def corrupting_write(fd, data, path):
            data = bytearray(memoryview(data).cast("B"))
            if len(data) > 1024:  # tensor data, not the header
                data[len(data) // 2] ^= 0x01
            real_write(fd, bytes(data), path)

        monkeypatch.setattr(writer_module, "_write_all", corrupting_write)
    else:
        real_copy = writer_module._copy_range

        def corrupting_copy(src, dst, offset, nbytes, path):
            real_copy(src, dst, offset, nbytes, path)
            last = os.pread(src, 1, offset + nbytes - 1)
            os.pwrite(dst, bytes([last[0] ^ 0x01]), os.lseek(dst, 0, os.SEEK_CUR) - 1)

        monkeypatch.setattr(writer_module, "_copy_range", corrupting_copy)
    out = tmp_path / "out"
    result = invoke("merge", base, lora, out, "--verify", "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert "reads back different bytes" in result.output and "Traceback" not in result.output
    assert not out.exists() and not leftovers(tmp_path)
    # Without --verify the same fault goes unnoticed: the check is what catches it.
    assert invoke("merge", base, lora, tmp_path / "unchecked", "--quiet", "--device", "cpu").exit_code == 0


def test_unmerge_verify_writes_a_manifest_that_checks(big, tmp_path) -> None:
    _, lora, reference = big
    out = tmp_path / "unmerged"
    result = invoke("unmerge", reference, lora, out, "--verify", "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    shards = sorted(out.glob("*.safetensors"))
    assert json.loads(result.output)["verification"]["files"] == len(shards)
    check = invoke("verify", out)
    assert check.exit_code == 0, check.output
