"""`loractl merge` onto a gpt-oss base stored in MXFP4 (experts as `_blocks`/`_scales`, as gpt-oss ships), compared
with PEFT's `merge_and_unload` on the model transformers loads from that checkpoint (it dequantizes MXFP4 on CPU):
tensors, the output's layout and logits. The MXFP4 checkpoint is packed by a packer written to the documented
layout (transformers' own quantizer needs triton kernels), checked here to round-trip through transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lora_cli.cli.app import app
from tests.builders import load_merged, logits_of, make_adapter, peft_logits
from tests.builders_quant import E2M1, merge_warnings, pack_mxfp4, write_gpt_oss_mxfp4

runner = CliRunner()
INPUTS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(7))
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
ADAPTERS = {
    # PEFT's ParamWrapper on both expert stacks (MoE adapters are trained this way on gpt-oss).
    "experts": LoraConfig(r=2, lora_alpha=4, target_parameters=EXPERTS),
    "attention": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
}


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def tiny_gpt_oss():
    """2 layers, 4 experts; hidden and intermediate sizes of 32, one MXFP4 group along each expert's input."""
    import transformers

    torch.manual_seed(0)
    config = transformers.GptOssConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        layer_types=["full_attention"] * 2,
    )
    model = transformers.GptOssForCausalLM(config)
    with torch.no_grad():  # biases start at zero; non-zero ones make every tensor count in the logits
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.02)
    return model.to(torch.bfloat16).eval()


def dequantized(path: Path, dtype: torch.dtype = torch.bfloat16):
    """The reference base: transformers loads the MXFP4 checkpoint dequantized (`convert_moe_packed_tensors`
    into the model's dtype), as it does on any CPU and as PEFT users load gpt-oss to train on it."""

    def build():
        from transformers import AutoModelForCausalLM, Mxfp4Config

        config = Mxfp4Config(dequantize=True)
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=config).eval()

    return build


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gptoss")
    tiny_gpt_oss().save_pretrained(root / "bf16")
    # Named as gpt-oss is ("openai/gpt-oss-20b"): nothing in the name says MXFP4, yet that is all it ships in.
    paths = {"bf16": root / "bf16", "mxfp4": write_gpt_oss_mxfp4(root / "bf16", root / "gpt-oss-tiny")}
    for name, config in ADAPTERS.items():
        # Factors of 0.1 make deltas about the size of the weights; much larger ones (0.3) make q.k so large that
        # bf16's rounding of the merged weights moves the logits by several ulps (the tensors stay bit-identical).
        make_adapter(dequantized(paths["mxfp4"]), config, root / name, scale=0.1)
        paths[name] = root / name
    return paths


def test_packer_round_trips_through_transformers() -> None:
    """Codes and scales unpack, through transformers' `convert_moe_packed_tensors`, to the nearest E2M1 value times
    the power of two that amax / 6 rounds up to; packing that again changes nothing; values on the grid are kept."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    generator = torch.Generator().manual_seed(3)
    stack = torch.randn(3, 64, 8, generator=generator) * torch.logspace(-3, 2, 8)  # [E, in, out], scales vary
    stack[0, :32, 0] = 0  # an all-zero group
    blocks, scales = pack_mxfp4(stack)
    assert blocks.shape == (3, 8, 2, 16) and scales.shape == (3, 8, 2) and blocks.dtype == scales.dtype == torch.uint8
    values = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    assert values.shape == stack.shape
    # Per group of 32 inputs ([E, out, group, 32]): the smallest power of two that brings amax within E2M1's 6...
    groups = stack.transpose(1, 2).reshape(3, 8, 2, 32)
    scale = torch.exp2(scales.float() - 127).unsqueeze(-1)
    amax = groups.abs().amax(-1, keepdim=True)
    assert (amax <= 6 * scale).all() and ((amax > 3 * scale) | (amax == 0)).all()
    # ...and each value the nearest E2M1 value times it.
    grid = torch.cat([-E2M1, E2M1]) * scale.unsqueeze(-1)
    error = (values.transpose(1, 2).reshape(groups.shape) - groups).abs()
    assert torch.equal(error, (grid - groups.unsqueeze(-1)).abs().amin(-1))
    again = convert_moe_packed_tensors(*pack_mxfp4(values), dtype=torch.float32)
    assert torch.equal(again, values)
    assert torch.equal(values[0, :32, 0], torch.zeros(32))


def test_mxfp4_base_reads_as_transformers_dequantizes_it(bases: dict) -> None:
    """The stored layout is gpt-oss's; loractl's logical tensors are the parameters transformers loads."""
    from lora_cli.io.checkpoint import open_checkpoint

    stored = set(load_file(bases["mxfp4"] / "model-00002-of-00002.safetensors"))
    assert stored == {
        f"model.layers.{i}.mlp.experts.{p}_scales" for i in range(2) for p in ("gate_up_proj", "down_proj")
    }
    index = open_checkpoint(bases["mxfp4"])
    model = dequantized(bases["mxfp4"])()
    assert type(model.model.layers[0].mlp.experts).__name__ == "GptOssExperts"
    reference = model.state_dict()
    assert set(index.tensors) == set(reference)
    for name in index.quantization.quantized:
        assert torch.equal(index.tensors[name].dequantize(), reference[name]), name


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_merge_onto_mxfp4_is_peft_on_the_dequantized_base(bases: dict, tmp_path: Path, adapter: str) -> None:
    out = tmp_path / "merged"
    result = invoke("merge", bases["mxfp4"], bases[adapter], out, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    assert not any("quantization error" in w for w in json.loads(result.stdout)["warnings"])  # trained on this base
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    merged = load_merged(out)
    # The plain gpt-oss layout (what save_pretrained writes for a bf16 model): every expert stack under its own name.
    assert set(merged) == set(load_merged(bases["bf16"]))
    assert all(t.dtype == torch.bfloat16 for t in merged.values())

    ref = tmp_path / "reference"
    PeftModel.from_pretrained(dequantized(bases["mxfp4"])(), bases[adapter]).merge_and_unload().save_pretrained(ref)
    reference = load_merged(ref)
    assert set(reference) == set(merged)
    base = dequantized(bases["mxfp4"])().state_dict()
    edited = {n for n in merged if not torch.equal(merged[n], base[n])}
    expected = {
        "experts": {f"model.layers.{i}.{p}" for i in range(2) for p in EXPERTS},
        "attention": {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in "qkvo"},
    }[adapter]
    assert edited == expected
    # Bit for bit: the dequantized weights are exact in bf16 (an E2M1 value times a power of two), the delta is
    # computed as PEFT computes it, and the sum is rounded once to bf16 as PEFT's in-place add rounds it.
    differ = [n for n in merged if not torch.equal(merged[n], reference[n])]
    assert differ == [], differ  # 37 of 37 tensors, 4 (experts) or 8 (attention) of them edited

    # Logits of the output loaded by plain transformers (no quantization config, no kernels) against the PeftModel
    # on the dequantized base, both in fp32: only the merged weights' one rounding to bf16 separates them.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert getattr(model.config, "quantization_config", None) is None
    with torch.no_grad():
        ours = model(INPUTS).logits
    unmerged = peft_logits(dequantized(bases["mxfp4"], torch.float32), bases[adapter], INPUTS)
    atol = 3 * 2**-8 * unmerged.abs().max().item()  # 3 bf16 ulps at the logits' scale
    torch.testing.assert_close(ours, unmerged, rtol=0, atol=atol)
    assert (unmerged - logits_of(dequantized(bases["mxfp4"], torch.float32)(), INPUTS)).abs().max() > 10 * atol


def test_requantize_to_mxfp4_is_refused_by_name(bases: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = invoke("merge", bases["mxfp4"], bases["experts"], out, "--device", "cpu", "--requantize")
    assert result.exit_code == 2, result.output
    assert "--requantize of mxfp4 weights (model.layers.0.mlp.experts." in result.output
    assert "is not supported" in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_missing_scales_are_named(bases: dict, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(bases["mxfp4"], broken)
    shard = broken / "model-00002-of-00002.safetensors"
    state = load_file(shard)
    del state["model.layers.1.mlp.experts.down_proj_scales"]
    save_file(state, shard)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.mlp.experts.down_proj_scales"]
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    result = invoke("merge", broken, bases["attention"], tmp_path / "out", "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert "model.layers.1.mlp.experts.down_proj has no model.layers.1.mlp.experts.down_proj_scales" in result.output
    assert not (tmp_path / "out").exists()


def test_adapter_trained_elsewhere_is_still_warned(bases: dict, tmp_path: Path) -> None:
    """Named after another (unquantized) base, an adapter merged onto the MXFP4 one still gets the warning."""
    warnings = merge_warnings(bases["mxfp4"], bases["attention"], tmp_path / "out", "unsloth/gpt-oss-20b-BF16")
    assert any("names no quantized model, but the base given is quantized (mxfp4)" in w for w in warnings), warnings


def test_diff_inspect_memory_and_unmerge_read_the_mxfp4_base(
    bases: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lora_cli import memory
    from lora_cli.numerics import max_ulps

    # The reference process's import cost is measured in a subprocess; not what this test is about.
    monkeypatch.setattr(memory, "reference_process_bytes", lambda: memory.REFERENCE_PROCESS_FALLBACK_BYTES)
    plain = tmp_path / "plain"
    dequantized(bases["mxfp4"])().save_pretrained(plain)
    result = invoke("diff", bases["mxfp4"], plain, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["differ"] is False, result.output
    for args in (("inspect", bases["experts"], "--base", bases["mxfp4"]), ("memory", bases["mxfp4"], bases["experts"])):
        assert invoke(*args, "--json").exit_code == 0
    merged = tmp_path / "merged"
    assert invoke("merge", bases["mxfp4"], bases["experts"], merged, "--device", "cpu").exit_code == 0
    result = invoke("diff", bases["mxfp4"], merged, "--adapter", bases["experts"], "--json")
    assert result.exit_code == 0, result.output  # they differ exactly by the adapter's delta
    assert json.loads(result.stdout)["adapter_check"]["verdict"] == "exact"
    result = invoke("unmerge", merged, bases["experts"], tmp_path / "back", "--device", "cpu")
    assert result.exit_code == 0, result.output
    back, base, after = load_merged(tmp_path / "back"), load_merged(plain), load_merged(merged)
    for name, original in base.items():  # (W + d) - d rounded to bf16: 1 ulp of W at max(|W|, |W + d|)
        assert max_ulps(back[name], original, at=torch.maximum(original.abs(), after[name].abs())) <= 1.0, name
