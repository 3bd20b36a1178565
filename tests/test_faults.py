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
import shutil
import signal
import stat
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


# ---------------------------------------------------------------- issue 17: inputs that change, OUT that is not ours


def _with_longer_header(shard: Path) -> bytes:
    """The same tensors behind a longer header: every data offset of the original now points elsewhere."""
    data = shard.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    header.setdefault("__metadata__", {})["padding"] = "x" * 4096
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + data[8 + length :]


@pytest.mark.parametrize("verify", [False, True], ids=["plain", "verify"])
@pytest.mark.parametrize("how", ["renamed_over", "rewritten_in_place"])
def test_base_changed_during_a_merge_is_refused(how, verify, big, tmp_path, monkeypatch) -> None:
    """A shard replaced while the merge runs (the case a probe found: 5 of 8 runs exited 0 with wrong tensors,
    passing --verify): every read goes through the descriptor opened first, and before OUT appears the path must
    still name that same, unmodified file. Exit 2 naming the shard; nothing written."""
    base_src, lora, _ = big
    base = Path(shutil.copytree(base_src, tmp_path / "base"))
    victim = sorted(base.glob("model-*.safetensors"))[-1]
    replacement = _with_longer_header(victim)
    real_copy = writer_module._copy_range
    swapped = []

    def copy_then_swap(src, dst, offset, nbytes, path):
        real_copy(src, dst, offset, nbytes, path)
        if not swapped:
            swapped.append(True)
            if how == "renamed_over":
                (base / "incoming").write_bytes(replacement)
                os.rename(base / "incoming", victim)
            else:
                with open(victim, "r+b") as handle:
                    handle.write(replacement)

    monkeypatch.setattr(writer_module, "_copy_range", copy_then_swap)
    out = tmp_path / "out"
    result = invoke("merge", base, lora, out, "--device", "cpu", *(["--verify"] if verify else []))
    assert swapped, "the shard was never swapped"
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in message
    assert str(victim) in message and ("was replaced" in message or "was modified" in message), message
    assert not out.exists() and not leftovers(tmp_path)


def test_overwrite_refuses_a_folder_loractl_did_not_write(big, tmp_path) -> None:
    """`--overwrite` replaces only an empty folder or loractl's own output. A stacked merge that forgot OUT
    (`merge base lora lora2 --overwrite`) would otherwise replace the adapter lora2 with a merged model."""
    base, lora, _ = big
    lora2 = Path(shutil.copytree(lora, tmp_path / "lora2"))
    before = snapshot(lora2)
    forgot = invoke("merge", base, lora, lora2, "--overwrite")
    assert forgot.exit_code == 2, forgot.output
    assert "did you forget OUT?" in forgot.output and "a PEFT adapter" in forgot.output, forgot.output
    assert snapshot(lora2) == before
    # The folder the user stands in, holding their files (`loractl merge ../base ../lora . --overwrite`).
    here = tmp_path / "project"
    here.mkdir()
    (here / "notes.md").write_text("keep me")
    refused = invoke("merge", base, lora, here, "--overwrite")
    assert refused.exit_code == 2 and "did you forget OUT?" in refused.output, refused.output
    assert (here / "notes.md").read_text() == "keep me"
    # An empty folder is fine.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert invoke("merge", base, lora, empty, "--overwrite", "--quiet", "--device", "cpu").exit_code == 0
    assert not leftovers(tmp_path)


def test_overwrite_never_writes_through_links_in_out(big, tmp_path) -> None:
    """An OUT (loractl's own) whose files are symlinks to the base's: replacing it writes new files beside them
    and renames, so the base is never written through a link."""
    base_src, lora, reference = big
    base = Path(shutil.copytree(base_src, tmp_path / "base"))
    out = tmp_path / "out"
    assert invoke("merge", base, lora, out, "--quiet", "--device", "cpu").exit_code == 0
    for path in out.iterdir():
        if (base / path.name).exists():
            path.unlink()
            path.symlink_to(base / path.name)
    before = snapshot(base)
    result = invoke("merge", base, lora, out, "--overwrite", "--quiet", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert snapshot(base) == before
    assert not any(p.is_symlink() for p in out.iterdir())
    assert_valid_merge(out, reference)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_out_gets_the_mode_the_umask_gives(umask, big, tmp_path) -> None:
    """OUT is made by mkdtemp (mode 0700) and renamed into place: its mode is set from the umask first, so
    another user or a serving process can read it when the umask says so."""
    base, lora, _ = big
    previous = os.umask(umask)
    try:
        result = invoke("merge", base, lora, tmp_path / "out", "--quiet", "--device", "cpu")
    finally:
        os.umask(previous)
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~umask


def test_long_out_name_gets_a_shorter_temporary_sibling(big, tmp_path) -> None:
    """A name the filesystem takes (here 240 bytes) is not refused because its hidden sibling's would be too long."""
    base, lora, reference = big
    out = tmp_path / ("m" * 240)
    result = invoke("merge", base, lora, out, "--quiet", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert_valid_merge(out, reference)
    assert not leftovers(tmp_path)


# ---------------------------------------------------------------- issue 17: verify agrees with sha256sum -c


@pytest.fixture(scope="module")
def verified(big, tmp_path_factory) -> Path:
    base, lora, _ = big
    out = tmp_path_factory.mktemp("verified") / "out"
    assert invoke("merge", base, lora, out, "--verify", "--quiet", "--device", "cpu").exit_code == 0
    return out


def _variant(verified: Path, tmp_path: Path, manifest: str | bytes | None = None) -> Path:
    out = Path(shutil.copytree(verified, tmp_path / "out"))
    if manifest is not None:
        (out / MANIFEST).unlink()
        (out / MANIFEST).write_bytes(manifest.encode() if isinstance(manifest, str) else manifest)
    return out


def _sha256sum(out: Path, *extra: str) -> int | None:
    """`sha256sum -c` on OUT's manifest, or None where coreutils' sha256sum is not installed."""
    if shutil.which("sha256sum") is None:
        return None
    done = subprocess.run(["sha256sum", "-c", *extra, MANIFEST], cwd=out, capture_output=True)
    return done.returncode


def test_verify_reads_every_format_sha256sum_reads(verified, tmp_path) -> None:
    lines = (verified / MANIFEST).read_text().splitlines()
    pairs = [line.split("  ", 1) for line in lines]
    formats = {
        "binary": "".join(f"{h} *{n}\n" for h, n in pairs),
        "upper_case": "".join(f"{h.upper()}  {n}\n" for h, n in pairs),
        "bsd_tag": "".join(f"SHA256 ({n}) = {h}\n" for h, n in pairs),
        "crlf_and_comment": "# made by loractl\r\n" + "".join(f"{h}  ./{n}\r\n" for h, n in pairs),
    }
    for name, manifest in formats.items():
        out = _variant(verified, tmp_path / name, manifest)
        result = invoke("verify", out)
        assert result.exit_code == 0, f"{name}: {result.output}"
        assert _sha256sum(out) in (0, None), name


def test_verify_is_strict_about_coverage_and_format(verified, tmp_path) -> None:
    def refused(out: Path, *needles: str) -> None:
        result = invoke("verify", out)
        message = result.output.strip()
        assert result.exit_code == 2, result.output
        assert len(message.splitlines()) == 1 and "Traceback" not in message
        assert all(n in message for n in needles), message

    # A file in a subfolder that the manifest does not list (sha256sum -c would pass it).
    out = _variant(verified, tmp_path / "subfolder")
    (out / "extra").mkdir()
    (out / "extra" / "payload.bin").write_bytes(b"unlisted")
    refused(out, "does not list", "extra/payload.bin")
    # An empty manifest checks nothing.
    refused(_variant(verified, tmp_path / "empty", ""), "lists no files", MANIFEST)
    # Not UTF-8.
    refused(_variant(verified, tmp_path / "latin1", b"\xff\xfe" + (verified / MANIFEST).read_bytes()), MANIFEST)
    # A line sha256sum would skip as improperly formatted, and a name leading out of the folder.
    refused(_variant(verified, tmp_path / "garbled", "not a checksum line\n"), "line 1", MANIFEST)
    outside = (verified / MANIFEST).read_text() + f"{'0' * 64}  ../secret\n"
    refused(_variant(verified, tmp_path / "outside", outside), "outside the folder")
    # A listed file that is a named pipe is refused, not waited on.
    out = _variant(verified, tmp_path / "fifo")
    shard = sorted(out.glob("*.safetensors"))[0]
    shard.unlink()
    os.mkfifo(shard)
    refused(out, "named pipe", shard.name)
