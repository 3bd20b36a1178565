"""Start-up: what `--help`, `--version`, a usage error and `verify` import, and Ctrl-C at any moment of it.

Import checks, not timings (timings depend on the machine; README quotes them): torch, transformers,
huggingface_hub and rich.progress must not be imported until a command computes tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.builders import make_adapter, save_base, tiny_llama

HEAVY = ("torch", "transformers", "huggingface_hub", "safetensors.torch", "rich.progress", "peft")

_PROBE = """
import json, sys
from lora_cli.cli.app import app
try:
    app(sys.argv[1:], prog_name="loractl")
except SystemExit as exc:
    code = exc.code
sys.stderr.write("\\nIMPORTED " + json.dumps([m for m in {heavy!r} if m in sys.modules]) + " EXIT " + str(code) + "\\n")
"""


def _imported(*args: str) -> tuple[list[str], str]:
    probe = _PROBE.format(heavy=HEAVY)
    done = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=120)
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("IMPORTED "), done.stderr
    imported, _, code = line.removeprefix("IMPORTED ").partition(" EXIT ")
    return json.loads(imported), code


def _verified_folder(root: Path) -> Path:
    """A checkpoint folder with SHA256SUMS, written by hand (a tiny F32 safetensors file), no torch needed."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    data = struct.pack("<Q", len(header)) + header + struct.pack("<2f", 1.0, 2.0)
    root.mkdir()
    (root / "model.safetensors").write_bytes(data)
    (root / "SHA256SUMS").write_text(f"{hashlib.sha256(data).hexdigest()}  model.safetensors\n")
    return root


@pytest.mark.parametrize(
    "args",
    [["--help"], ["--version"], ["merge", "--help"], ["diff", "--help"], ["inspect", "--help"], ["merge", "only-one"]],
    ids=["help", "version", "merge-help", "diff-help", "inspect-help", "usage-error"],
)
def test_help_version_and_usage_errors_import_no_torch(args: list[str]) -> None:
    imported, code = _imported(*args)
    assert imported == [], f"{args} imported {imported}"
    assert code in ("0", "2", "None")


def test_verify_imports_no_torch(tmp_path: Path) -> None:
    folder = _verified_folder(tmp_path / "out")
    imported, code = _imported("verify", str(folder))
    assert code in ("0", "None")
    assert imported == [], imported


# -- Ctrl-C during start-up ---------------------------------------------------------------------------------------


def _handler_installed(pid: int) -> bool:
    """True once loractl's own handler is in place: SIGTERM is caught (Python leaves it at its default)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
    return bool(caught & (1 << (signal.SIGTERM - 1)))


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("startup")
    save_base(tiny_llama(), root / "base")
    from peft import LoraConfig

    make_adapter(tiny_llama, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]), root / "lora")
    return root / "base", root / "lora"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc to see the handler installed")
@pytest.mark.parametrize("delay", [0.0, 0.05, 0.2, 0.5, 1.0, 2.0, 4.0])
def test_ctrl_c_at_start_up_exits_130_with_one_line(small, tmp_path: Path, delay: float) -> None:
    """SIGINT while the interpreter imports torch/transformers, parses, or after the merge: always exit 130 with
    one line and no traceback; a complete OUT is said to be complete, else nothing is left behind."""
    base, lora = small
    out = tmp_path / "out"
    env = {**os.environ, "COLUMNS": "200"}
    command = [sys.executable, "-m", "lora_cli", "merge", str(base), str(lora), str(out), "--device", "cpu"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    while not _handler_installed(process.pid):
        assert process.poll() is None and time.monotonic() < deadline, "loractl never installed its handler"
        time.sleep(0.002)
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    outcome = f"delay {delay}: exit {process.returncode}: {stderr!r}"
    if process.returncode == 0:  # the signal came after the process had finished its work and exited
        return
    assert process.returncode == 130, outcome
    assert "Traceback" not in stderr and "terminate called" not in stderr, outcome
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, outcome
    if out.exists():
        assert lines[0] == f"interrupted after the work was done: {out} is complete", outcome
    else:
        assert lines[0] in ("interrupted: nothing was written", "interrupted: no partial output was left behind")
        assert not any(p.name.startswith(".") or "tmp" in p.name for p in tmp_path.iterdir()), outcome


def test_signal_after_the_work_says_out_is_complete() -> None:
    """Phase 3, made deterministic: the work is done, a signal arrives: exit 130 and say what is complete."""
    code = (
        "import os, signal, time\n"
        "from lora_cli.cli import _signals\n"
        "_signals.install_start_up()\n"
        "_signals.work_done('./merged is complete')\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "time.sleep(30)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 130
    assert done.stderr == "interrupted after the work was done: ./merged is complete\n"


def test_interruption_once_out_was_renamed_into_place_says_it_is_complete(tmp_path: Path, capsys) -> None:
    """A KeyboardInterrupt that lands between the atomic rename and the library's return: OUT is whole."""
    import typer

    from lora_cli.cli._errors import user_errors

    out = tmp_path / "out"
    with pytest.raises(typer.Exit) as exit_info, user_errors(out=str(out)):
        out.mkdir()
        raise KeyboardInterrupt
    assert exit_info.value.exit_code == 130
    assert capsys.readouterr().err == f"interrupted after the work was done: {out} is complete\n"
    with pytest.raises(typer.Exit), user_errors(out=str(tmp_path / "never")):
        raise KeyboardInterrupt
    assert capsys.readouterr().err == "interrupted: no partial output was left behind\n"
