"""`loractl merge --combine`: the merged checkpoint is base + the mergekit combination of the adapters' deltas,
checked against the fp64 transcription of mergekit's formulas (tests/test_combine.py) on deltas formed in fp64
from the adapters' factors; DARE reproducible across runs and shard layouts; non-additive adapters refused.

Tolerance: the merge forms each delta in fp32 (PEFT's order) and combines in fp32; the reference is fp64 and
the output fp32: rtol 1e-5, atol 1e-6 * max|delta| (entries of base + delta that nearly cancel).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file
from typer.testing import CliRunner

from lora_cli.cli.app import app
from tests.builders import load_merged, make_adapter, save_base, tiny_llama
from tests.test_combine import reference

runner = CliRunner()


def lora_deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """scale * B @ A in fp64 per base tensor name, straight from the adapter file."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    state = load_file(adapter / "adapter_model.safetensors")
    deltas = {}
    for key, a in state.items():
        if key.endswith("lora_A.weight"):
            b = state[key.replace("lora_A", "lora_B")]
            name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            deltas[name] = (b.double() @ a.double()) * (config["lora_alpha"] / config["r"])
    return deltas


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("combine")
    save_base(tiny_llama(), root / "base")
    save_base(tiny_llama(), root / "sharded", max_shard_size="40KB")
    make_adapter(tiny_llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"]), root / "a", seed=1)
    make_adapter(tiny_llama, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), root / "b", seed=2, scale=0.7)
    return root


def invoke(*args: object):
    return runner.invoke(app, ["merge", *map(str, args), "-q"])


@pytest.mark.parametrize(
    "method, extra",
    [
        ("ties", ["--density", "0.5"]),
        ("ties", ["--density", "0.3", "--majority-sign", "frequency", "--no-normalize"]),
        ("dare_linear", ["--density", "0.4", "--seed", "3"]),
        ("dare_ties", ["--density", "0.6", "--seed", "5"]),
        ("magnitude_prune", ["--density", "0.2"]),
    ],
)
def test_merge_combine_equals_mergekits_formulas_on_the_deltas(inputs, tmp_path, method, extra):
    result = invoke(
        inputs / "base", f"{inputs / 'a'}@0.7", f"{inputs / 'b'}@0.5", tmp_path / "out", "--combine", method, *extra
    )
    assert result.exit_code == 0, result.output
    merged, base = load_merged(tmp_path / "out"), load_merged(inputs / "base")
    a, b = lora_deltas(inputs / "a"), lora_deltas(inputs / "b")
    density = float(extra[1])
    majority = "count" if "frequency" in extra else "sum"
    normalize = False if "--no-normalize" in extra else None
    seed = int(extra[extra.index("--seed") + 1]) if "--seed" in extra else 0
    for name, tensor in merged.items():
        if name not in a:
            assert torch.equal(tensor, base[name]), name
            continue
        # b leaves up_proj alone: for mergekit, a model whose delta there is zero.
        deltas = [a[name], b.get(name, torch.zeros_like(a[name]))]
        expected = reference(deltas, [0.7, 0.5], method, density, majority, normalize, seed=seed, name=name)
        torch.testing.assert_close(
            tensor.double() - base[name].double(), expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max())
        )


def test_dare_is_the_same_across_runs_and_shard_layouts(inputs, tmp_path):
    args = ["--combine", "dare_ties", "--density", "0.5", "--seed", "9"]
    for source, out in [(inputs / "base", "one"), (inputs / "sharded", "two"), (inputs / "base", "three")]:
        result = invoke(source, inputs / "a", inputs / "b", tmp_path / out, *args)
        assert result.exit_code == 0, result.output
    one, two, three = (load_merged(tmp_path / name) for name in ("one", "two", "three"))
    assert len(list((tmp_path / "two").glob("*.safetensors"))) > 1
    for name, tensor in one.items():
        assert torch.equal(tensor, two[name]) and torch.equal(tensor, three[name]), name
    other = invoke(inputs / "base", inputs / "a", inputs / "b", tmp_path / "seed10", *args[:-1], "10")
    assert other.exit_code == 0
    changed = load_merged(tmp_path / "seed10")
    assert not torch.equal(
        changed["model.layers.0.self_attn.q_proj.weight"], one["model.layers.0.self_attn.q_proj.weight"]
    )


def test_ties_depends_only_on_the_ratio_of_the_weights(inputs, tmp_path):
    for weights, out in [(("0.6", "0.4"), "small"), (("3", "2"), "large")]:
        a, b = f"{inputs / 'a'}@{weights[0]}", f"{inputs / 'b'}@{weights[1]}"
        assert invoke(inputs / "base", a, b, tmp_path / out, "--combine", "ties", "--density", "0.5").exit_code == 0
    small, large = load_merged(tmp_path / "small"), load_merged(tmp_path / "large")
    for name, tensor in small.items():
        torch.testing.assert_close(tensor, large[name], rtol=1e-6, atol=1e-6)


def test_combine_refuses_an_adapter_without_a_delta_in_one_line(inputs, tmp_path):
    make_adapter(tiny_llama, LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), tmp_path / "dora")
    result = invoke(inputs / "base", inputs / "a", tmp_path / "dora", tmp_path / "out", "--combine", "ties")
    assert result.exit_code == 2 and "--combine ties needs deltas" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    bad = invoke(inputs / "base", inputs / "a", tmp_path / "x", "--combine", "slerp")
    assert bad.exit_code == 2 and "slerp" in bad.output


def test_diff_proves_a_combined_merge_and_catches_the_wrong_combination(inputs, tmp_path):
    a, b = f"{inputs / 'a'}@0.7", f"{inputs / 'b'}@0.5"
    args = ["--combine", "dare_ties", "--density", "0.5", "--seed", "2"]
    assert invoke(inputs / "base", a, b, tmp_path / "out", *args).exit_code == 0
    check = ["diff", str(inputs / "base"), str(tmp_path / "out"), "--adapter", a, "--adapter", b, "--json"]
    proved = runner.invoke(app, [*check, *args])
    assert proved.exit_code == 0, proved.output
    assert json.loads(proved.output)["adapter_check"]["verdict"] in ("exact", "pass")
    for wrong in ([], ["--combine", "dare_ties", "--density", "0.5", "--seed", "3"]):
        refuted = runner.invoke(app, [*check, *wrong])
        assert refuted.exit_code == 1, refuted.output
        assert json.loads(refuted.output)["adapter_check"]["verdict"] == "fail"
