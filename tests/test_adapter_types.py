"""Every adapter type loractl merges, against PEFT's merge_and_unload on tiny models built here.

Tolerances: for each type loractl computes PEFT's delta with the same operations in the same order in fp32 and
rounds once, as PEFT's CPU merge does when the adapter weights are fp32 (PEFT upcasts them by default), so merged
tensors are compared for exact equality in fp32 and bf16 (except where PEFT itself rounds more often: BF16_ULPS).
Logits are compared with the unmerged PeftModel, whose forward sums in another order: 1e-4 absolute in fp32. An
undo (`TensorEdit.revert`) rounds twice more, W + d then - d (or * l then / l), so it lands within 1 ulp of the
base counted at the larger of the base and merged values; the undo of rotations and of MiSS bat is a linear solve,
within 8 fp32 eps of the tensor's largest value.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from peft import (
    AdaLoraConfig,
    BOFTConfig,
    C3AConfig,
    DeloraConfig,
    FourierFTConfig,
    HRAConfig,
    IA3Config,
    LNTuningConfig,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    MissConfig,
    OFTConfig,
    PveraConfig,
    RandLoraConfig,
    RoadConfig,
    ShiraConfig,
    VBLoRAConfig,
    VeraConfig,
)
from safetensors.torch import load_file, save_file

from lora_cli.errors import AdapterMismatchError, UnsupportedAdapterError
from lora_cli.merge import merge
from lora_cli.numerics import max_ulps
from lora_cli.sources import AdapterSpec, local_source
from tests.builders import (
    load_merged,
    logits_of,
    make_adapter,
    peft_logits,
    peft_merged_state,
    save_base,
    tiny_gpt2,
    tiny_llama,
    tiny_mlp,
)
from tests.builders_types import LLAMA_LINEARS, TOKENS, conv_inputs, revert_all, tiny_convnet

ATTN = ["q_proj", "v_proj", "down_proj"]
CONVS = ["conv1", "conv2", "head"]

# name -> (model, PEFT config); "llama" is tiny_llama, "conv" the conv net with a 3x3, a 1x1 and a linear layer.
CASES = {
    "loha": ("llama", LoHaConfig(r=4, alpha=6, target_modules=LLAMA_LINEARS, init_weights=False)),
    "loha_patterns": (
        "llama",
        LoHaConfig(
            r=4,
            alpha=6,
            target_modules=ATTN,
            rank_pattern={"v_proj": 2},
            alpha_pattern={"layers.1.self_attn.q_proj": 3},
            init_weights=False,
        ),
    ),
    "lokr": ("llama", LoKrConfig(r=4, alpha=6, target_modules=LLAMA_LINEARS, init_weights=False)),
    "lokr_decompose_both": (
        "llama",
        LoKrConfig(r=2, alpha=3, target_modules=ATTN, decompose_both=True, decompose_factor=4, init_weights=False),
    ),
    "ia3": (
        "llama",
        IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    ),
    "adalora": (
        "llama",
        AdaLoraConfig(init_r=6, target_r=4, total_step=10, lora_alpha=5, target_modules=ATTN, init_lora_weights=False),
    ),
    "vera": ("llama", VeraConfig(r=4, target_modules=["q_proj", "k_proj", "up_proj", "down_proj"])),
    "road": (
        "llama",
        RoadConfig(variant="road_1", group_size=8, target_modules=["q_proj", "o_proj"], init_weights=False),
    ),
    "road_mlp_bias": (
        "mlp",
        RoadConfig(variant="road_2", group_size=8, target_modules=["fc1", "fc2"], init_weights=False),
    ),
    "road_4": ("llama", RoadConfig(variant="road_4", group_size=4, target_modules=["k_proj"], init_weights=False)),
    "miss": ("llama", MissConfig(r=4, target_modules=["q_proj", "down_proj"], init_weights=False)),
    "miss_unaligned": ("llama", MissConfig(r=5, target_modules=["q_proj"], init_weights=False)),
    "miss_mini": ("llama", MissConfig(r=4, mini_r=8, target_modules=ATTN, init_weights="mini")),
    "miss_bat": ("llama", MissConfig(r=4, target_modules=ATTN, init_weights="bat")),
    "pvera": ("llama", PveraConfig(r=4, target_modules=["q_proj", "down_proj"])),
    "fourierft": (
        "llama",
        FourierFTConfig(
            n_frequency=40, scaling=30.0, target_modules=ATTN, n_frequency_pattern={"v_proj": 10}, init_weights=False
        ),
    ),
    "oft": ("llama", OFTConfig(oft_block_size=8, target_modules=ATTN, init_weights=False)),
    "oft_coft_shared_exact_cayley": (
        "llama",
        OFTConfig(
            oft_block_size=4,
            target_modules=["k_proj", "o_proj"],
            coft=True,
            eps=1e-2,
            block_share=True,
            use_cayley_neumann=False,
            init_weights=False,
        ),
    ),
    "boft": ("llama", BOFTConfig(boft_block_size=4, target_modules=ATTN, init_weights=False)),
    "shira": ("llama", ShiraConfig(r=2, target_modules=ATTN)),
    "ln_tuning": ("llama", LNTuningConfig(target_modules=["input_layernorm", "norm"])),
    "hra": ("llama", HRAConfig(r=4, target_modules=ATTN, init_weights=False)),
    "hra_gram_schmidt": ("llama", HRAConfig(r=3, target_modules=["k_proj"], apply_GS=True, init_weights=False)),
    "c3a": ("llama", C3AConfig(block_size=8, target_modules=ATTN, init_weights=False)),  # see BF16_ULPS
    "delora": ("llama", DeloraConfig(r=4, delora_lambda=5.0, target_modules=ATTN, init_weights=False)),
    "randlora": ("llama", RandLoraConfig(r=4, randlora_alpha=8, target_modules=["q_proj", "k_proj", "down_proj"])),
    "vblora": ("llama", VBLoRAConfig(r=4, num_vectors=16, vector_length=8, topk=2, target_modules=ATTN)),
    # GPT-2's Conv1D stores weights transposed (fan_in_fan_out).
    "ia3_gpt2": (
        "gpt2",
        IA3Config(target_modules=["c_attn", "c_fc"], feedforward_modules=["c_fc"], fan_in_fan_out=True),
    ),
    "adalora_gpt2": (
        "gpt2",
        AdaLoraConfig(init_r=4, total_step=10, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False),
    ),
    "vera_gpt2": ("gpt2", VeraConfig(r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    "fourierft_gpt2": (
        "gpt2",
        FourierFTConfig(n_frequency=30, target_modules=["c_fc"], fan_in_fan_out=True, init_weights=False),
    ),
    "randlora_gpt2": ("gpt2", RandLoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True)),
    "vblora_gpt2": (
        "gpt2",
        VBLoRAConfig(r=2, num_vectors=8, vector_length=8, target_modules=["c_fc"], fan_in_fan_out=True),
    ),
    "lora_conv": ("conv", LoraConfig(r=2, lora_alpha=3, target_modules=CONVS, init_lora_weights=False)),
    "loha_conv": ("conv", LoHaConfig(r=2, alpha=3, target_modules=CONVS, init_weights=False)),
    "loha_conv_cp": (
        "conv",
        LoHaConfig(r=2, alpha=3, target_modules=CONVS, use_effective_conv2d=True, init_weights=False),
    ),
    "lokr_conv": ("conv", LoKrConfig(r=2, alpha=3, target_modules=CONVS, init_weights=False)),
    "lokr_conv_cp": (
        "conv",
        LoKrConfig(r=1, alpha=3, target_modules=CONVS, use_effective_conv2d=True, init_weights=False),
    ),
    "ia3_conv": ("conv", IA3Config(target_modules=CONVS, feedforward_modules=["conv2"])),
    "boft_conv": (
        "conv",
        BOFTConfig(boft_block_size=0, boft_block_num=4, target_modules=["conv1", "conv2"], init_weights=False),
    ),
    "hra_conv": ("conv", HRAConfig(r=2, target_modules=["conv1", "conv2"], init_weights=False)),
    # 1x1 conv and linear only: on a padded 3x3 conv PEFT's own merge_and_unload disagrees with its unmerged forward
    # (that forward rotates unfolded patches without the padding), so there is no logit reference to test against.
    "adalora_conv": (
        "conv",
        AdaLoraConfig(init_r=2, total_step=10, target_modules=["conv1", "conv2"], init_lora_weights=False),
    ),
    "oft_conv": ("conv", OFTConfig(oft_block_size=4, target_modules=["conv2", "head"], init_weights=False)),
}


def gpt2_with_biases(dtype: torch.dtype = torch.float32):
    """tiny_gpt2 with random biases (GPT-2 starts them at zero), so that IA3's bias scaling shows."""
    model = tiny_gpt2(dtype)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.add_((torch.randn(param.shape, generator=generator) * 0.1).to(dtype))
    return model


FACTORIES = {"llama": tiny_llama, "gpt2": gpt2_with_biases, "conv": tiny_convnet, "mlp": tiny_mlp}
INPUTS = {"conv": conv_inputs(), "mlp": torch.randn(5, 16, generator=torch.Generator().manual_seed(3))}

# Cases where PEFT rounds to bf16 more than once: DeLoRA rounds its delta to the base dtype before adding it (RandLoRA
# does too; loractl replays that rounding), C3A also divides in that dtype, RoAd rounds its 2x2 rotations before
# multiplying. Each of those roundings is at most half a bf16 ulp of its operand and loractl's single one another
# half, so the results differ by at most 1 (DeLoRA) or 2 (C3A, RoAd) ulps counted at the larger of the base weight and
# the change.
# Cases whose undo is a linear solve rather than a subtraction or a division.
SOLVED = ("oft", "boft", "hra", "road", "miss_bat")
# Cases made with PEFT's own random-init scale (0.1) instead of 0.5: larger values leave the matrices they build
# (OFT's Neumann series, BOFT's Cayley blocks, MiSS bat's I + B) badly conditioned, and their undo with them.
SMALL_INIT = ("oft", "boft", "miss_bat")

BF16_ULPS = {"c3a": 2.0, "delora": 1.0, "road": 2.0}


def run_case(tmp_path: Path, case: str, dtype: torch.dtype):
    model, config = CASES[case]
    factory = functools.partial(FACTORIES[model], dtype)
    base_dir, adapter_dir, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "out"
    save_base(factory(), base_dir)
    make_adapter(factory, config, adapter_dir, scale=0.1 if case.startswith(SMALL_INIT) else 0.5)
    if config.peft_type.value == "ROAD":
        near_one_alphas(adapter_dir / "adapter_model.safetensors")
    summary = merge(local_source(base_dir), [AdapterSpec(local_source(adapter_dir))], out)
    return factory, summary, load_merged(out), base_dir, adapter_dir


def near_one_alphas(path: Path) -> None:
    """RoAd's scales start at 1; random ones near 0 would make its rotation (and the undo's solve) ill-conditioned."""
    tensors = load_file(path)
    for key, tensor in tensors.items():
        if "road_alpha" in key:
            tensors[key] = 1 + 0.2 * tensor
    save_file(tensors, path, metadata={"format": "pt"})


def merged_logits(model: str, factory, state: dict[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
    network = factory()
    network.load_state_dict(state, strict=model in INPUTS)  # saved transformers models drop some buffers
    return logits_of(network, inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_type_matches_peft_merge(tmp_path, case, dtype):
    model, _ = CASES[case]
    factory, summary, ours, base_dir, adapter_dir = run_case(tmp_path, case, dtype)
    ref = peft_merged_state(factory, adapter_dir)
    base = load_file(next(base_dir.glob("*.safetensors")))
    assert set(ours) == set(base) and set(ours) <= set(ref)  # a tied head is in PEFT's state dict, not in files
    changed = [name for name in ours if not torch.equal(ours[name], base[name])]
    assert changed and len(changed) == summary.tensors_edited
    budget = BF16_ULPS.get(case.split("_")[0], 0.0) if dtype == torch.bfloat16 else 0.0
    for name, tensor in ours.items():
        if budget:
            at = torch.maximum(base[name].float().abs(), (tensor.float() - base[name].float()).abs())
            assert max_ulps(tensor, ref[name], at=at) <= budget, name
        else:
            assert torch.equal(tensor, ref[name]), f"{name}: {max_ulps(tensor, ref[name])} ulps from PEFT"
    if dtype == torch.float32:
        inputs = INPUTS.get(model, TOKENS)
        expected = peft_logits(factory, adapter_dir, inputs)
        assert torch.allclose(merged_logits(model, factory, ours, inputs), expected, atol=1e-4)
        restored = revert_all(base_dir, [adapter_dir], ours)
        for name, tensor in restored.items():
            if case.startswith(SOLVED):
                # A rotation is undone by a solve: each value mixes a block of rounded products, so the error is a
                # few fp32 eps of the tensor's largest value (HRA mixes whole rows) rather than an ulp of its own.
                error = (tensor - base[name]).abs().max()
                assert error <= 8 * torch.finfo(torch.float32).eps * base[name].abs().max(), name
            else:
                at = torch.maximum(base[name].abs(), ours[name].abs())
                assert max_ulps(tensor, base[name], at=at) <= 1.0, name


def test_every_peft_type_is_merged_or_refused_by_name():
    from peft import PeftType

    from lora_cli.adapters.refused import REFUSED
    from lora_cli.adapters.registry import REGISTRY

    names = {t.value for t in PeftType}
    assert names <= set(REGISTRY) | set(REFUSED), names - set(REGISTRY) - set(REFUSED)
    assert not set(REGISTRY) & set(REFUSED)


def test_refused_type_is_named_with_its_reason(tmp_path):
    from peft import LilyConfig

    factory = functools.partial(tiny_llama, torch.float32)
    save_base(factory(), tmp_path / "base")
    make_adapter(factory, LilyConfig(r=2, target_modules=["q_proj"]), tmp_path / "adapter")
    with pytest.raises(UnsupportedAdapterError, match="LILY is not supported: PEFT cannot merge it either"):
        merge(local_source(tmp_path / "base"), [AdapterSpec(local_source(tmp_path / "adapter"))], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_lora_on_a_grouped_conv_is_refused_as_peft_does(tmp_path):
    class Grouped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 8, 3, groups=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)

    def factory() -> Grouped:
        torch.manual_seed(0)
        return Grouped()

    save_base(factory(), tmp_path / "base")
    make_adapter(factory, LoraConfig(r=2, target_modules=["conv"], init_lora_weights=False), tmp_path / "adapter")
    with pytest.raises(AdapterMismatchError, match="grouped convolution"):
        merge(local_source(tmp_path / "base"), [AdapterSpec(local_source(tmp_path / "adapter"))], tmp_path / "out")


@pytest.mark.parametrize("case", ["oft", "hra"])
def test_weight_on_a_rotation_is_refused(tmp_path, case):
    model, config = CASES[case]
    factory = functools.partial(FACTORIES[model], torch.float32)
    save_base(factory(), tmp_path / "base")
    make_adapter(factory, config, tmp_path / "adapter", scale=0.1)
    spec = AdapterSpec(local_source(tmp_path / "adapter"), weight=0.5)
    with pytest.raises(UnsupportedAdapterError, match="no delta to scale, so ADAPTER@WEIGHT is not defined"):
        merge(local_source(tmp_path / "base"), [spec], tmp_path / "out")
    assert not (tmp_path / "out").exists()
