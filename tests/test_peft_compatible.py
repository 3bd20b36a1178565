"""`loractl combine --peft-compatible` against PEFT's own `add_weighted_adapter` on a tiny Llama: the saved
tensors and config of the new adapter, PEFT's refusals, and its quirks (one adapter switches to linear, use_rslora
carries over).

Tolerance: none for the deterministic methods (cat, linear, ties, magnitude_prune and their *_svd forms run the
same operations on the same fp32 inputs, and the SVD is the same LAPACK call): torch.equal. DARE draws its masks
from another generator than PEFT's global one, so only its shapes, determinism and loading are checked.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file
from typer.testing import CliRunner

from lora_cli.cli.app import app
from tests.builders import logits_of, make_adapter, tiny_llama

runner = CliRunner()
INPUTS = torch.tensor([[4, 9, 1, 66, 23, 7, 50, 2]])
DETERMINISTIC = ["linear", "cat", "svd", "ties", "ties_svd", "magnitude_prune", "magnitude_prune_svd"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("peft-compatible")
    make_adapter(tiny_llama, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), root / "a", seed=1)
    make_adapter(tiny_llama, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "o_proj"]), root / "b", seed=2)
    make_adapter(tiny_llama, LoraConfig(r=2, target_modules=["q_proj"]), root / "r2", seed=3)
    rs = LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj"], use_rslora=True)
    make_adapter(tiny_llama, rs, root / "rslora", seed=4)
    return root


def peft_combined(adapters: list[Path], weights: list[float], out: Path, **kwargs) -> PeftModel:
    model = PeftModel.from_pretrained(tiny_llama(), adapters[0], adapter_name="in0")
    for index, path in enumerate(adapters[1:], 1):
        model.load_adapter(path, adapter_name=f"in{index}")
    model.add_weighted_adapter([f"in{i}" for i in range(len(adapters))], weights, "ab", **kwargs)
    model.save_pretrained(out, selected_adapters=["ab"])
    model.set_adapter("ab")
    return model


def ours(adapters: list[Path], weights: list[float], out: Path, *args: str) -> dict:
    refs = [f"{path}@{weight}" for path, weight in zip(adapters, weights, strict=True)]
    result = runner.invoke(app, ["combine", *refs, str(out), "--peft-compatible", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


@pytest.mark.parametrize("combination_type", DETERMINISTIC)
def test_deterministic_methods_equal_peft_tensor_for_tensor(adapters, tmp_path, combination_type):
    inputs, weights = [adapters / "a", adapters / "b"], [0.7, -0.5]
    density = ["--density", "0.5"] if "ties" in combination_type or "magnitude" in combination_type else []
    ours(inputs, weights, tmp_path / "ours", "--method", combination_type, *density)
    kwargs = {"density": 0.5} if density else {}
    model = peft_combined(inputs, weights, tmp_path / "peft", combination_type=combination_type, **kwargs)
    theirs = load_file(tmp_path / "peft" / "ab" / "adapter_model.safetensors")
    mine = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert set(mine) == set(theirs)
    for key, tensor in theirs.items():
        assert torch.equal(mine[key], tensor), key
    their_config = json.loads((tmp_path / "peft" / "ab" / "adapter_config.json").read_text())
    my_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    for field in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora"):
        assert my_config[field] == their_config[field], field
    assert sorted(my_config["target_modules"]) == sorted(their_config["target_modules"])
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    torch.testing.assert_close(logits_of(loaded, INPUTS), logits_of(model, INPUTS), rtol=0, atol=0)


def test_one_adapter_switches_to_linear_and_rslora_carries_over(adapters, tmp_path):
    report = ours([adapters / "rslora"], [0.5], tmp_path / "ours", "--method", "ties", "--density", "0.5")
    assert report["method"] == "linear (PEFT)"
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["use_rslora"] is True and config["r"] == config["lora_alpha"] == 4
    model = peft_combined([adapters / "rslora"], [0.5], tmp_path / "peft", combination_type="ties", density=0.5)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    torch.testing.assert_close(logits_of(loaded, INPUTS), logits_of(model, INPUTS), rtol=0, atol=0)


def test_dare_is_seeded_and_loads(adapters, tmp_path):
    inputs = [adapters / "a", adapters / "b"]
    for name, seed in (("one", "3"), ("two", "3"), ("three", "4")):
        ours(inputs, [1.0, 1.0], tmp_path / name, "--method", "dare_ties", "--density", "0.5", "--seed", seed)
    one, two, three = (load_file(tmp_path / n / "adapter_model.safetensors") for n in ("one", "two", "three"))
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert any(not torch.equal(one[k], three[k]) for k in one)
    PeftModel.from_pretrained(tiny_llama(), tmp_path / "one")


def test_peft_refusals_are_one_line_errors(adapters, tmp_path):
    for args, needle in [
        ([f"{adapters / 'a'}@1", f"{adapters / 'r2'}@1", "--method", "ties", "--density", "0.5"], "same r value"),
        ([f"{adapters / 'a'}@1", f"{adapters / 'b'}@1", "--method", "ties"], "needs a density"),
    ]:
        result = runner.invoke(app, ["combine", *args, str(tmp_path / "x"), "--peft-compatible"])
        assert result.exit_code == 2 and needle in result.output and "Traceback" not in result.output, result.output
        assert not (tmp_path / "x").exists()
    # Unequal ranks are fine for cat and the SVD methods (PEFT: the sum, or the largest rank).
    report = ours([adapters / "a", adapters / "r2"], [1.0, 1.0], tmp_path / "cat", "--method", "cat")
    assert {m["rank"] for m in report["modules"]} == {6}


@pytest.mark.parametrize("combination_type", ["ties", "svd", "cat"])
def test_merge_peft_compatible_equals_peft_add_weighted_then_merge_and_unload(adapters, tmp_path, combination_type):
    from tests.builders import load_merged, save_base

    save_base(tiny_llama(), tmp_path / "base")
    refs = [f"{adapters / 'a'}@0.7", f"{adapters / 'b'}@-0.5"]
    args = ["--peft-compatible", "--combine", combination_type, "--density", "0.5", "-q"]
    result = runner.invoke(app, ["merge", str(tmp_path / "base"), *refs, str(tmp_path / "out"), *args])
    assert result.exit_code == 0, result.output
    assert not list(tmp_path.glob(".loractl-peft-*"))  # the combined adapter was a temporary
    kwargs = {"density": 0.5} if combination_type == "ties" else {}
    model = peft_combined(
        [adapters / "a", adapters / "b"], [0.7, -0.5], tmp_path / "peft", combination_type=combination_type, **kwargs
    )
    for name in ("in0", "in1"):
        model.delete_adapter(name)
    expected = model.merge_and_unload().state_dict()
    merged = load_merged(tmp_path / "out")
    for name, tensor in merged.items():
        assert torch.equal(tensor, expected[name]), name
    provenance = json.loads((tmp_path / "out" / "loractl.json").read_text())
    assert provenance["peft_combination"]["combination_type"] == combination_type
    assert [a["weight"] for a in provenance["adapters"]] == [0.7, -0.5]
