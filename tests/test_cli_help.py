"""Help reads as README writes it, and the options a newcomer tried mean what they say.

One help test per command: the usage line as README writes it, examples present, no `<bool>` beside a flag,
the --device default, and --revision naming the command's own first argument.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lora_cli.cli._common import check_dtype
from lora_cli.cli.app import app
from lora_cli.errors import InputError

runner = CliRunner()
WIDE = {"COLUMNS": "200"}

USAGE = {
    "merge": "loractl merge [OPTIONS] BASE ADAPTER... OUT",
    "unmerge": "loractl unmerge [OPTIONS] MERGED ADAPTER... OUT",
    "diff": "loractl diff [OPTIONS] A B",
    "inspect": "loractl inspect [OPTIONS] ADAPTER",
    "memory": "loractl memory [OPTIONS] BASE ADAPTER...",
    "verify": "loractl verify [OPTIONS] OUT",
    "demo": "loractl demo [OPTIONS]",
}
REVISION_OF = {"merge": "BASE", "unmerge": "MERGED", "inspect": "ADAPTER", "memory": "BASE"}


def _help(command: str) -> str:
    result = runner.invoke(app, [command, "--help"], env=WIDE, prog_name="loractl")
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.parametrize("command", sorted(USAGE))
def test_help_has_the_usage_line_examples_and_no_bool_types(command: str) -> None:
    text = _help(command)
    assert f"Usage: {USAGE[command]}" in text
    assert "Examples:" in text and f"loractl {command}" in text.split("Examples:", 1)[1]
    assert "<bool>" not in text and "{" not in text.split("\n", 3)[1]
    lines = text.splitlines()
    if "--device" in text:
        assert "[default: auto]" in next(line for line in lines if "--device" in line)
    if command in REVISION_OF:
        revision = next(line for line in lines if "--revision " in line or "--revision," in line)
        assert f"of {REVISION_OF[command]} " in revision, revision


def test_top_level_help_and_version() -> None:
    result = runner.invoke(app, ["--help"], env=WIDE, prog_name="loractl")
    assert result.exit_code == 0 and "<bool>" not in result.stdout
    assert runner.invoke(app, ["--version"]).stdout.startswith("loractl ")


def test_diff_max_ulps_default_in_help_is_the_library_default() -> None:
    from lora_cli.diff import DEFAULT_MAX_ULPS

    assert f"(default: {DEFAULT_MAX_ULPS:g})" in _help("diff")


@pytest.mark.parametrize(("given", "name"), [("bf16", "bfloat16"), ("FP16", "float16"), ("fp32", "float32")])
def test_dtype_short_names(given: str, name: str) -> None:
    assert check_dtype(given) == name
    assert check_dtype(name) == name
    with pytest.raises(InputError, match="bf16"):
        check_dtype("half-ish")


def _bad_merge(tmp_path: Path, *args: str, json_output: bool = False):
    base = tmp_path / "base"
    base.mkdir(exist_ok=True)
    extra = ["--json"] if json_output else []
    return runner.invoke(app, ["merge", str(base), *args, str(tmp_path / "out"), *extra])


def test_weight_that_is_not_a_number_is_said_so(tmp_path: Path) -> None:
    result = _bad_merge(tmp_path, str(tmp_path / "lora@half"))
    assert result.exit_code == 2
    assert "the weight after '@' ('half') is not a number" in result.stderr
    assert "@0.5" in result.stderr and "Hugging Face" not in result.stderr


def test_mistyped_local_folder_says_no_such_folder_first(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "llama-base").mkdir()
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["inspect", "./llama-bse"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ./llama-bse: no such folder (did you mean llama-base?)")


def test_json_errors_are_one_json_object_on_stdout(tmp_path: Path) -> None:
    result = _bad_merge(tmp_path, str(tmp_path / "nope"), json_output=True)
    assert result.exit_code == 2
    record = json.loads(result.stdout)
    assert set(record) == {"error", "file", "fix", "exit_code"}
    assert record["exit_code"] == 2 and record["file"] == str(tmp_path / "nope") and record["fix"]
    assert result.stderr.startswith("error: ")


def test_swap_hint_fits_each_command(tmp_path: Path) -> None:
    from peft import LoraConfig

    from tests.builders import make_adapter, save_base, tiny_llama

    save_base(tiny_llama(), tmp_path / "base")
    make_adapter(tiny_llama, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]), tmp_path / "lora")
    base, lora = str(tmp_path / "base"), str(tmp_path / "lora")
    merge = runner.invoke(app, ["merge", lora, base, str(tmp_path / "o1")])
    assert merge.exit_code == 2 and "pass the base model first" in merge.stderr
    unmerge = runner.invoke(app, ["unmerge", lora, base, str(tmp_path / "o2")])
    assert unmerge.exit_code == 2 and "pass the merged checkpoint first" in unmerge.stderr
    diff = runner.invoke(app, ["diff", base, lora])
    assert diff.exit_code == 2 and "--adapter" in diff.stderr and "base model first" not in diff.stderr


def test_verify_message_names_the_file_once(tmp_path: Path) -> None:
    import hashlib

    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"x")
    (out / "SHA256SUMS").write_text(f"{hashlib.sha256(b'y').hexdigest()}  model.safetensors\n")
    result = runner.invoke(app, ["verify", str(out)])
    assert result.exit_code == 2
    assert result.stderr.count("model.safetensors") == 1, result.stderr
