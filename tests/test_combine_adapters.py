"""`loractl combine`: cat against PEFT's add_weighted_adapter(combination_type="cat"), the other methods against
`merge --combine` (the same arithmetic, then an SVD), PEFT loading every written adapter, and refusals.

Tolerances: cat's factors are PEFT's own products (A * w * scale), compared bit for bit where both adapters adapt
a module; logits atol 1e-4 (fp32, 2 layers). A combined delta kept whole (--energy 1) comes back from its SVD
within a small multiple of eps32 * ||delta||_2 (the SVD's backward error): bound 8.
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
from tests.builders import load_merged, logits_of, make_adapter, save_base, tiny_llama

runner = CliRunner()
INPUTS = torch.tensor([[5, 2, 77, 13, 1, 40, 8, 3]])
EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("combine-adapters")
    save_base(tiny_llama(), root / "base")
    make_adapter(tiny_llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"]), root / "a", seed=1)
    make_adapter(tiny_llama, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), root / "b", seed=2, scale=0.7)
    return root


def invoke(command: str, *args: object):
    return runner.invoke(app, [command, *map(str, args)])


def test_cat_is_peft_cat_and_exact(inputs, tmp_path):
    result = invoke("combine", f"{inputs / 'a'}@0.7", f"{inputs / 'b'}@0.5", tmp_path / "cat", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    ranks = {m["module"]: m["rank"] for m in report["modules"]}
    assert ranks["model.layers.0.self_attn.q_proj"] == 6 and ranks["model.layers.0.mlp.up_proj"] == 4

    model = PeftModel.from_pretrained(tiny_llama(), inputs / "a", adapter_name="a")
    model.load_adapter(inputs / "b", adapter_name="b")
    model.add_weighted_adapter(["a", "b"], [0.7, 0.5], "ab", combination_type="cat")
    ours = load_file(tmp_path / "cat" / "adapter_model.safetensors")
    for key, a in ours.items():
        if "lora_A" not in key:
            continue
        module = model.base_model.model.get_submodule(key.removeprefix("base_model.model.").split(".lora_A")[0])
        peft_a, peft_b = module.lora_A["ab"].weight, module.lora_B["ab"].weight
        b = ours[key.replace("lora_A", "lora_B")]
        # PEFT pads a module only one adapter adapts with zero rows up to the summed rank (6): ours has its own.
        assert torch.equal(peft_a[: a.shape[0]], a) and torch.equal(peft_b[:, : b.shape[1]], b), key
        assert not peft_a[a.shape[0] :].any()
    model.set_adapter("ab")
    expected = logits_of(model, INPUTS)
    ours_model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "cat")
    torch.testing.assert_close(logits_of(ours_model, INPUTS), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "method, extra",
    [("ties", ["--density", "0.5"]), ("dare_ties", ["--density", "0.4", "--seed", "4"]), ("sum", [])],
)
def test_combined_adapter_at_full_energy_merges_to_merge_combine(inputs, tmp_path, method, extra):
    a, b = f"{inputs / 'a'}@0.7", f"{inputs / 'b'}@0.5"
    result = invoke("combine", a, b, tmp_path / "ad", "--method", method, "--energy", "1", *extra)
    assert result.exit_code == 0, result.output
    merged = invoke("merge", inputs / "base", a, b, tmp_path / "direct", "--combine", method, *extra, "-q")
    assert merged.exit_code == 0, merged.output
    via = invoke("merge", inputs / "base", tmp_path / "ad", tmp_path / "via", "-q")
    assert via.exit_code == 0, via.output
    direct, through, base = (
        load_merged(tmp_path / "direct"),
        load_merged(tmp_path / "via"),
        load_merged(inputs / "base"),
    )
    for name, tensor in direct.items():
        delta = tensor - base[name]
        if not delta.any():
            assert torch.equal(through[name], tensor), name
            continue
        bound = 8 * EPS32 * float(torch.linalg.matrix_norm(delta, ord=2))
        assert float((through[name] - tensor).abs().max()) <= bound, name


def test_default_rank_is_the_largest_input_rank_and_peft_loads_it(inputs, tmp_path):
    result = invoke("combine", inputs / "a", inputs / "b", tmp_path / "t", "--method", "ties", "--density", "0.5")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "t" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 4 and not config["rank_pattern"]
    assert config["target_modules"] == ["q_proj", "up_proj", "v_proj"]
    model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "t")
    assert torch.isfinite(logits_of(model, INPUTS)).all()
    energy = invoke("combine", inputs / "a", inputs / "b", tmp_path / "e", "--method", "ties", "--energy", "0.8")
    assert energy.exit_code == 0, energy.output
    config = json.loads((tmp_path / "e" / "adapter_config.json").read_text())
    assert config["rank_pattern"] and config["alpha_pattern"] == config["rank_pattern"]
    PeftModel.from_pretrained(tiny_llama(), tmp_path / "e")


def test_combine_refuses_what_it_cannot_combine_in_one_line(inputs, tmp_path):
    make_adapter(tiny_llama, LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), tmp_path / "dora")
    make_adapter(tiny_llama, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]), tmp_path / "mts")
    for args, needle in [
        ([inputs / "a", tmp_path / "dora", tmp_path / "x"], "dora r=2"),
        ([inputs / "a", tmp_path / "mts", tmp_path / "x", "--method", "ties"], "modules_to_save"),
        ([inputs / "a", inputs / "b", tmp_path / "x", "--method", "slerp"], "slerp"),
        ([inputs / "a", inputs / "b", tmp_path / "x", "--rank", "2", "--energy", "0.5"], "at most one"),
    ]:
        result = invoke("combine", *args)
        assert result.exit_code == 2 and needle in result.output and "Traceback" not in result.output, result.output
        assert not (tmp_path / "x").exists()
