"""Several adapters in one pass, against PEFT applying them one after the other; weights; lineage warnings.

Tolerances: a stack merged by PEFT is merged, saved and merged again, rounding to the checkpoint dtype between the
two; loractl keeps the running tensor in fp32 and rounds once. In fp32 both round after every add, so they agree
bit for bit; in bf16 PEFT's extra rounding moves the result by at most 1 bf16 ulp, counted at the larger of the
intermediate and final values. A weighted pair is compared with PEFT's `add_weighted_adapter(combination_type="cat")`,
which folds weight * scaling into A and multiplies the concatenated factors once: the same sum of products in
another association, so within 4 fp32 ulps counted at the larger of the base weight and the summed magnitude of the
products (w * scaling * |B| @ |A|), which is what the rounding of a sum of products scales with.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoHaConfig, LoraConfig, OFTConfig, PeftModel
from safetensors.torch import load_file
from typer.testing import CliRunner

from lora_cli.cli.app import app
from lora_cli.errors import UnsupportedAdapterError
from lora_cli.merge import merge
from lora_cli.numerics import max_ulps
from lora_cli.sources import AdapterSpec, local_source
from tests.builders import load_merged, make_adapter, peft_merged_state, save_base, tiny_llama
from tests.builders_types import LLAMA_LINEARS

LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
LORA_2 = LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "o_proj", "down_proj"], init_lora_weights=False)
LOHA = LoHaConfig(r=2, alpha=3, target_modules=["q_proj", "gate_proj"], init_weights=False)
IA3 = IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"])


def from_folder(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def sft_then_rl(tmp_path: Path, dtype: torch.dtype, second) -> tuple[Path, Path, Path, Path]:
    """The TRL workflow: adapter 1 on the base, merged by PEFT, then adapter 2 trained on that merged model."""
    factory = functools.partial(tiny_llama, dtype)
    base, first, sft_merged, rl = (tmp_path / name for name in ("base", "sft", "sft-merged", "rl"))
    save_base(factory(), base)
    make_adapter(factory, LORA, first, seed=1)
    PeftModel.from_pretrained(factory(), first).merge_and_unload().save_pretrained(sft_merged)
    make_adapter(functools.partial(from_folder, sft_merged, dtype), second, rl, seed=2)
    return base, first, sft_merged, rl


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("second", [LORA_2, LOHA, IA3], ids=["lora+lora", "lora+loha", "lora+ia3"])
def test_stack_matches_peft_merging_one_after_the_other(tmp_path, dtype, second):
    base, first, sft_merged, rl = sft_then_rl(tmp_path, dtype, second)
    summary = merge(
        local_source(base), [AdapterSpec(local_source(first)), AdapterSpec(local_source(rl))], tmp_path / "o"
    )
    ours = load_merged(tmp_path / "o")
    ref = peft_merged_state(functools.partial(from_folder, sft_merged, dtype), rl)
    middle = load_merged(sft_merged)
    assert summary.tensors_edited == 2 * len({*LORA.target_modules, *second.target_modules})
    assert any(not torch.equal(ours[name], middle[name]) for name in ours)
    for name, tensor in ours.items():
        if dtype == torch.float32:
            assert torch.equal(tensor, ref[name]), name
        else:
            at = torch.maximum(middle[name].float().abs(), ref[name].float().abs())
            assert max_ulps(tensor, ref[name], at=at) <= 1.0, name


def product_magnitude(adapter_dir: Path, name: str, factor: float) -> torch.Tensor:
    """factor * (|B| @ |A|): the size of the terms a LoRA delta sums, which bounds its rounding error."""
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    module = f"base_model.model.{name.removesuffix('.weight')}"
    return factor * (tensors[f"{module}.lora_B.weight"].abs() @ tensors[f"{module}.lora_A.weight"].abs())


def test_weighted_pair_matches_peft_cat_combination(tmp_path):
    # fp32 only: PEFT creates the combined adapter in the base's dtype, so in bf16 its concatenated factors are
    # rounded to bf16 before the product and the reference itself is off by many ulps.
    factory = functools.partial(tiny_llama, torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_LINEARS, init_lora_weights=False)
    save_base(factory(), tmp_path / "base")
    make_adapter(factory, config, tmp_path / "a", seed=1)
    make_adapter(factory, config, tmp_path / "b", seed=2)
    specs = [AdapterSpec(local_source(tmp_path / "a"), 0.7), AdapterSpec(local_source(tmp_path / "b"), 0.3)]
    merge(local_source(tmp_path / "base"), specs, tmp_path / "out")
    ours = load_merged(tmp_path / "out")

    model = PeftModel.from_pretrained(factory(), tmp_path / "a", adapter_name="a")
    model.load_adapter(tmp_path / "b", adapter_name="b")
    model.add_weighted_adapter(["a", "b"], [0.7, 0.3], "ab", combination_type="cat")
    model.set_adapter("ab")
    ref = model.merge_and_unload(adapter_names=["ab"]).state_dict()
    base = factory().state_dict()
    scaling = config.lora_alpha / config.r
    for name, tensor in ours.items():
        if name not in base or torch.equal(tensor, base[name]):
            assert torch.equal(tensor, ref[name]), name
            continue
        terms = product_magnitude(tmp_path / "a", name, 0.7 * scaling) + product_magnitude(
            tmp_path / "b", name, 0.3 * scaling
        )
        at = torch.maximum(base[name].abs(), terms)
        assert max_ulps(tensor, ref[name], at=at) <= 4.0, name
    assert not torch.equal(ours["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])


def test_stacked_adapter_trained_elsewhere_is_a_warning_naming_both(tmp_path):
    base, first, sft_merged, rl = sft_then_rl(tmp_path, torch.float32, LORA_2)
    renamed = json.loads((first / "adapter_config.json").read_text()) | {"base_model_name_or_path": str(base)}
    (first / "adapter_config.json").write_text(json.dumps(renamed))
    result = CliRunner().invoke(app, ["merge", str(base), str(first), str(rl), str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.output
    warnings = json.loads(result.stdout)["warnings"]
    assert len(warnings) == 1 and str(rl) in warnings[0] and str(sft_merged) in warnings[0], warnings


def test_strict_refuses_an_adapter_for_another_model(tmp_path):
    factory = functools.partial(tiny_llama, torch.float32)
    save_base(factory(), tmp_path / "base")
    make_adapter(factory, LORA, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "someone/other-model"
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    args = ["merge", str(tmp_path / "base"), str(tmp_path / "a"), str(tmp_path / "out")]
    warned = CliRunner().invoke(app, [*args, "--json"])
    assert warned.exit_code == 0, warned.output
    assert "someone/other-model" in json.loads(warned.stdout)["warnings"][0]
    refused = CliRunner().invoke(app, [*args[:-1], str(tmp_path / "out2"), "--strict"])
    assert refused.exit_code == 2
    assert "someone/other-model" in refused.output and not (tmp_path / "out2").exists()


def test_ia3_weight_scales_the_change_and_rotations_refuse_a_weight(tmp_path):
    factory = functools.partial(tiny_llama, torch.float32)
    save_base(factory(), tmp_path / "base")
    make_adapter(factory, IA3, tmp_path / "ia3")
    merge(local_source(tmp_path / "base"), [AdapterSpec(local_source(tmp_path / "ia3"), 0.5)], tmp_path / "out")
    ours, base = load_merged(tmp_path / "out"), load_merged(tmp_path / "base")
    vectors = load_file(tmp_path / "ia3" / "adapter_model.safetensors")
    scale = vectors["base_model.model.model.layers.0.self_attn.q_proj.ia3_l"].reshape(-1, 1)
    expected = base["model.layers.0.self_attn.q_proj.weight"] * (1 + 0.5 * (scale - 1))
    assert torch.equal(ours["model.layers.0.self_attn.q_proj.weight"], expected)

    make_adapter(factory, OFTConfig(oft_block_size=8, target_modules=["q_proj"]), tmp_path / "oft", scale=0.1)
    with pytest.raises(UnsupportedAdapterError, match="OFT rotation has no delta"):
        merge(local_source(tmp_path / "base"), [AdapterSpec(local_source(tmp_path / "oft"), 0.5)], tmp_path / "o2")
