"""`loractl merge` from the command line: output modes, and every bad input ending in one line and exit 2."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import save_file
from typer.testing import CliRunner

from lora_cli.cli.app import app
from tests.builders import make_adapter, save_base, tiny_llama

runner = CliRunner()
FACTORY = functools.partial(tiny_llama, torch.bfloat16)


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pair")
    save_base(FACTORY(), root / "base", max_shard_size="60KB")
    make_adapter(FACTORY, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False), root / "lora")
    return root / "base", root / "lora"


def snapshot(*folders: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest() for f in folders for p in sorted(f.rglob("*")) if p.is_file()
    }


def copy_folder(source: Path, target: Path) -> Path:
    """A copy of an input to break, so the original stays intact for the other tests."""
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def assert_clean_failure(result, out: Path, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    message = result.output.strip()
    assert len(message.splitlines()) == 1, message
    for needle in needles:
        assert needle in message, message
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.loractl-tmp-*"))


def test_json_summary_for_ci(pair, tmp_path):
    base, lora = pair
    before = snapshot(base, lora)
    result = invoke("merge", base, lora, tmp_path / "out", "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["tensors_edited"] == 4
    assert summary["bytes_written"] > 0
    assert summary["peak_rss_anon_bytes"] > 0
    assert sorted(summary["files"]) == sorted(p.name for p in base.glob("*.safetensors"))
    assert snapshot(base, lora) == before
    provenance = json.loads((tmp_path / "out" / "loractl.json").read_text())
    assert provenance["adapters"][0]["peft_type"] == "LORA"
    assert provenance["base"]["ref"] == str(base)


def test_human_summary_and_quiet(pair, tmp_path):
    base, lora = pair
    result = invoke("merge", base, lora, tmp_path / "out")
    assert result.exit_code == 0
    assert "tensors edited" in result.output
    quiet = invoke("merge", base, lora, tmp_path / "out2", "--quiet")
    assert quiet.exit_code == 0 and quiet.output == ""


def test_existing_out_is_refused_then_replaced_with_overwrite(pair, tmp_path):
    base, lora = pair
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = invoke("merge", base, lora, out)
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (out / "keep.txt").exists()
    # --overwrite replaces only loractl's own output (issue 17): a folder of someone's files is kept.
    refused = invoke("merge", base, lora, out, "--overwrite")
    assert refused.exit_code == 2 and "did you forget OUT?" in refused.output, refused.output
    assert (out / "keep.txt").read_text() == "mine"
    assert invoke("merge", base, lora, out / "previous").exit_code == 0
    previous = out / "previous"
    (previous / "keep.txt").write_text("mine")
    assert invoke("merge", base, lora, previous, "--overwrite").exit_code == 0
    assert not (previous / "keep.txt").exists() and (previous / "loractl.json").exists()


def test_reshard_with_max_shard_size(pair, tmp_path):
    base, lora = pair
    result = invoke("merge", base, lora, tmp_path / "out", "--max-shard-size", "1GB", "--json")
    assert json.loads(result.output)["files"] == ["model.safetensors"]
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_out_inside_an_input_is_refused(pair):
    base, lora = pair
    assert_clean_failure(invoke("merge", base, lora, base / "merged"), base / "merged", "inside the input")


def test_missing_base(pair, tmp_path):
    _, lora = pair
    out = tmp_path / "out"
    assert_clean_failure(invoke("merge", tmp_path / "nope", lora, out), out, "nope")


def test_adapter_for_another_base_names_the_tensors(pair, tmp_path):
    base, _ = pair
    other = functools.partial(tiny_llama, torch.bfloat16, hidden_size=48, num_attention_heads=4)
    make_adapter(other, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False), tmp_path / "other")
    config = json.loads((tmp_path / "other" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "org/some-other-model"
    (tmp_path / "other" / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    result = invoke("merge", base, tmp_path / "other", out)
    assert_clean_failure(result, out, "q_proj", "org/some-other-model")


def test_truncated_shard(pair, tmp_path):
    base, lora = pair
    broken = copy_folder(base, tmp_path / "broken")
    shard = sorted(broken.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    out = tmp_path / "out"
    assert_clean_failure(invoke("merge", broken, lora, out), out, shard.name, "truncated")


def test_index_naming_a_missing_shard(pair, tmp_path):
    base, lora = pair
    broken = copy_folder(base, tmp_path / "broken")
    missing = sorted(broken.glob("*.safetensors"))[0]
    missing.unlink()
    out = tmp_path / "out"
    assert_clean_failure(invoke("merge", broken, lora, out), out, missing.name, "missing")


def test_pickle_where_safetensors_was_expected(pair, tmp_path):
    _, lora = pair
    broken = tmp_path / "broken"
    broken.mkdir()
    torch.save({"w": torch.zeros(2)}, broken / "model.safetensors")
    out = tmp_path / "out"
    assert_clean_failure(invoke("merge", broken, lora, out), out, "pickle")


def test_pickle_only_base(pair, tmp_path):
    _, lora = pair
    broken = tmp_path / "broken"
    broken.mkdir()
    torch.save({"w": torch.zeros(2)}, broken / "pytorch_model.bin")
    out = tmp_path / "out"
    assert_clean_failure(invoke("merge", broken, lora, out), out, "pickle", "safetensors")


def test_malformed_adapter_config(pair, tmp_path):
    base, lora = pair
    broken = tmp_path / "lora"
    broken.mkdir()
    (broken / "adapter_model.safetensors").write_bytes((lora / "adapter_model.safetensors").read_bytes())
    (broken / "adapter_config.json").write_text("{ not json")
    out = tmp_path / "out"
    assert_clean_failure(invoke("merge", base, broken, out), out, "adapter_config.json", "JSON")


def test_non_finite_adapter_stops_the_merge(pair, tmp_path):
    base, lora = pair
    broken = tmp_path / "lora"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((lora / "adapter_config.json").read_text())
    from safetensors.torch import load_file

    tensors = load_file(lora / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, broken / "adapter_model.safetensors")
    out = tmp_path / "out"
    assert_clean_failure(invoke("merge", base, broken, out), out, "NaN")


def test_help_documents_every_option():
    result = invoke("merge", "--help")
    for option in ("--revision", "--device", "--dtype", "--max-shard-size", "--overwrite", "--json", "--quiet"):
        assert option in result.output
    assert "Examples" in result.output


def test_demo_runs_offline():
    result = invoke("demo", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["logits_match"] is True
