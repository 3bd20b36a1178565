"""The adapter types PEFT 0.21 added or that need the base weight, against PEFT's merge_and_unload on tiny models.

Tolerances, per case below: merged tensors equal PEFT's bit for bit in fp32 (loractl computes PEFT's delta with the
same operations in the same order in fp32 and rounds once, as PEFT does with fp32 adapter weights). In bf16 PEFT
rounds more often than loractl for some types (it rounds the delta to the base dtype before adding it, or computes
parts in the base dtype): each such rounding is at most half a bf16 ulp of its operand and loractl's single one
another half, so those cases differ by at most the `bf16` budget in ulps, counted at the larger of the base value and
the change. Logits are compared with the unmerged PeftModel (another summation order): 1e-4 absolute in fp32. An
undo lands within 1 ulp of the base at the larger of the base and merged values (two more roundings); edits that
computed their change from the base weight itself are undone with `--base`, exactly.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import (
    AdamssConfig,
    BeftConfig,
    DeftConfig,
    FrodConfig,
    GloraConfig,
    GraloraConfig,
    HiraConfig,
    OFTConfig,
    OSFConfig,
    PeanutConfig,
    PeftConfig,
    PsoftConfig,
    RandLoraConfig,
    SupertuningConfig,
    TinyLoraConfig,
    TrainableTokensConfig,
    UniLoraConfig,
    VeraConfig,
    WaveFTConfig,
)
from safetensors.torch import load_file

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
from tests.builders_types import TOKENS, revert_all

ATTN = ["q_proj", "v_proj", "down_proj"]


@dataclass(frozen=True)
class Case:
    model: str
    config: PeftConfig
    # Most ulps from PEFT in bf16 (see the module docstring); 0 means bit for bit.
    bf16: float = 0.0
    # Whether each edit's undo needs the base (the change was computed from the base weight itself).
    undo_from_base: bool = False
    scale: float = 0.5
    # Most ulps of the undo from the base (see the module docstring).
    undo_ulps: float = 1.0
    # Whether the undo is a linear solve (a rotation): each value then mixes a block of rounded products, so its
    # error is a few fp32 eps of the tensor's largest value rather than an ulp of its own (8 eps, as elsewhere).
    solved: bool = False


CASES = {
    "beft": Case("mlp", BeftConfig(target_modules=["fc1", "fc2"], init_weights=False)),
    "gralora": Case("llama", GraloraConfig(r=4, alpha=8, gralora_k=2, target_modules=ATTN, init_weights=False)),
    "gralora_hybrid": Case(
        "llama", GraloraConfig(r=4, alpha=6, hybrid_r=2, gralora_k=4, target_modules=ATTN, init_weights=False)
    ),
    "gralora_gpt2": Case(
        "gpt2", GraloraConfig(r=4, gralora_k=2, target_modules=["c_attn"], fan_in_fan_out=True, init_weights=False)
    ),
    # The undo divides by 1 + B @ A: factors of PEFT's initial scale (0.1) keep it away from zero, as trained ones are.
    "hira": Case("llama", HiraConfig(r=4, target_modules=ATTN, init_weights=False), scale=0.1),
    "hira_embedding": Case("llama", HiraConfig(r=4, target_modules=["embed_tokens"], init_weights=False), scale=0.1),
    "hira_gpt2": Case(
        "gpt2", HiraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, init_weights=False), scale=0.1
    ),
    "osf": Case("llama", OSFConfig(effective_rank=8, target_modules=ATTN, init_weights=False), undo_from_base=True),
    "peanut": Case(
        "llama", PeanutConfig(r=4, depth=2, scaling=0.5, target_modules=ATTN, init_weights=False), undo_from_base=True
    ),
    "peanut_gelu": Case(
        "llama", PeanutConfig(r=4, act_fn="gelu", target_modules=["k_proj"], init_weights=False), undo_from_base=True
    ),
    "deft": Case("llama", DeftConfig(r=4, target_modules=ATTN, init_weights=False), undo_from_base=True),
    "deft_qr_alpha": Case(
        "llama",
        DeftConfig(r=4, alpha=8, decomposition_method="qr", target_modules=ATTN, init_weights=False),
        undo_from_base=True,
    ),
    "deft_para": Case("llama", DeftConfig(r=3, para=True, target_modules=["o_proj"]), undo_from_base=True),
    "deft_gpt2": Case(
        "gpt2", DeftConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, init_weights=False), undo_from_base=True
    ),
    "psoft": Case("llama", PsoftConfig(r=4, target_modules=ATTN, init_weights=False), undo_from_base=True, scale=0.1),
    "psoft_lowrank_pissa_neumann": Case(
        "llama",
        PsoftConfig(
            r=6,
            psoft_alpha=12,
            psoft_svd="lowrank",
            ab_svd_init="pissa_init",
            use_cayley_neumann=True,
            cayley_neumann_eps=0.5,
            psoft_mag_a=False,
            target_modules=ATTN,
            init_weights=False,
        ),
        undo_from_base=True,
        scale=0.1,
    ),
    "supertuning": Case("llama", SupertuningConfig(sparsity=0.9, target_modules=ATTN, init_weights=False)),
    # Two changes added one after the other: the undo rounds at W + values too, which the merged values do not show
    # (a value and the LoRA term may cancel), so up to 4 ulps at the larger of the base and the merged value.
    "supertuning_supra": Case(
        "llama",
        SupertuningConfig(sparsity=0.95, r=2, lora_alpha=3, target_modules=ATTN, init_weights=False),
        undo_ulps=4.0,
    ),
    "supertuning_bottom_recomputed": Case(
        "llama",
        SupertuningConfig(
            sparsity=0.9, select_top=False, save_precomputed_indices=False, target_modules=ATTN, init_weights=False
        ),
        undo_from_base=True,
    ),
    "tinylora": Case("llama", TinyLoraConfig(r=2, u=8, target_modules=ATTN, init_weights=False)),
    "tinylora_tied_embedding": Case(
        "llama",
        TinyLoraConfig(r=3, u=4, weight_tying=0.6, target_modules=["embed_tokens", "q_proj"], init_weights=False),
    ),
    "tinylora_gpt2": Case(
        "gpt2", TinyLoraConfig(r=2, u=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, init_weights=False)
    ),
    "trainable_tokens": Case(
        "llama", TrainableTokensConfig(token_indices=[1, 5, 90], target_modules=["embed_tokens"]), undo_from_base=True
    ),
    # A tied head: PEFT wraps it too, sharing the rows; the checkpoint keeps one tensor.
    "trainable_tokens_tied": Case(
        "llama_tied", TrainableTokensConfig(token_indices=[0, 7], target_modules=["embed_tokens"]), undo_from_base=True
    ),
    # Rotations of PEFT's initial scale (0.1): the undo is a solve, as for the other OFT cases.
    "oft_embedding": Case(
        "llama",
        OFTConfig(oft_block_size=8, target_modules=["embed_tokens", "q_proj"], init_weights=False),
        scale=0.1,
        solved=True,
    ),
    "vera_drawn": Case("llama", VeraConfig(r=4, target_modules=["q_proj", "k_proj", "up_proj"], save_projection=False)),
    "vera_drawn_gpt2": Case(
        "gpt2",
        VeraConfig(r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, save_projection=False),
    ),
    "randlora_drawn": Case("llama", RandLoraConfig(r=4, target_modules=["q_proj", "down_proj"], save_projection=False)),
    "randlora_drawn_sparse": Case(
        "llama", RandLoraConfig(r=8, sparse=True, target_modules=["v_proj", "up_proj"], save_projection=False)
    ),
    "randlora_drawn_very_sparse_gpt2": Case(
        "gpt2",
        RandLoraConfig(r=4, very_sparse=True, target_modules=["c_attn"], fan_in_fan_out=True, save_projection=False),
    ),
    "unilora": Case(
        "llama", UniLoraConfig(r=4, theta_d_length=64, target_modules=ATTN, save_indices=True, init_weights=False)
    ),
    "unilora_gpt2": Case(
        "gpt2",
        UniLoraConfig(r=2, theta_d_length=32, target_modules=["c_attn"], fan_in_fan_out=True, save_indices=True),
    ),
    # The undo is PEFT's unmerge, (W' - B) / (1 + A): two roundings more than a subtraction, so 2 ulps; factors of
    # PEFT's initial scale (0.1) keep 1 + A away from zero.
    "glora": Case("llama", GloraConfig(r=4, target_modules=ATTN, init_weights=False), scale=0.1, undo_ulps=2.0),
    "glora_vectors_biases": Case(
        "mlp",
        GloraConfig(
            config_A_B="vector", config_C="none", config_D_E="vector", target_modules=["fc1", "fc2"], init_weights=False
        ),
        scale=0.1,
        undo_ulps=2.0,
    ),
    "glora_constant": Case(
        "mlp",
        GloraConfig(config_A_B="constant", config_C="none", config_D_E="constant", target_modules=["fc2", "head"]),
        scale=0.1,
        undo_ulps=2.0,
    ),
    "waveft": Case("llama", WaveFTConfig(n_frequency=64, target_modules=ATTN, init_weights=False)),
    "waveft_db3": Case(
        "llama", WaveFTConfig(n_frequency=50, wavelet_family="db3", target_modules=["v_proj", "up_proj"])
    ),
    "waveft_coif2": Case("llama", WaveFTConfig(n_frequency=40, wavelet_family="coif2", target_modules=["k_proj"])),
    "waveft_no_idwt_gpt2": Case(
        "gpt2", WaveFTConfig(n_frequency=30, use_idwt=False, target_modules=["c_fc"], fan_in_fan_out=True)
    ),
    "waveft_gpt2": Case("gpt2", WaveFTConfig(n_frequency=30, target_modules=["c_attn"], fan_in_fan_out=True)),
    "frod": Case(
        "llama",
        FrodConfig(target_modules=["q_proj", "k_proj", "down_proj"], progressbar=False, init_weights=False),
        undo_from_base=True,
        scale=0.1,
    ),
    "frod_gpt2": Case(
        "gpt2",
        FrodConfig(target_modules=["c_attn"], fan_in_fan_out=True, sparse_rate=0.05, progressbar=False),
        undo_from_base=True,
        scale=0.1,
    ),
    "adamss": Case(
        "llama",
        AdamssConfig(r=8, num_subspaces=3, subspace_rank=2, target_modules=ATTN, init_weights=None),
        undo_from_base=True,
    ),
}


def gpt2_with_biases(dtype: torch.dtype = torch.float32):
    model = tiny_gpt2(dtype)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.add_((torch.randn(param.shape, generator=generator) * 0.1).to(dtype))
    return model


FACTORIES = {
    "llama": tiny_llama,
    "llama_tied": functools.partial(tiny_llama, tie_word_embeddings=True),
    "gpt2": gpt2_with_biases,
    "mlp": tiny_mlp,
}
INPUTS = {"mlp": torch.randn(5, 16, generator=torch.Generator().manual_seed(3))}


def run_case(tmp_path: Path, name: str, dtype: torch.dtype):
    case = CASES[name]
    factory = functools.partial(FACTORIES[case.model], dtype)  # dtype first: FACTORIES hold partials
    base_dir, adapter_dir, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "out"
    save_base(factory(), base_dir)
    make_adapter(factory, case.config, adapter_dir, scale=case.scale)
    summary = merge(local_source(base_dir), [AdapterSpec(local_source(adapter_dir))], out)
    return factory, summary, load_merged(out), base_dir, adapter_dir


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(CASES))
def test_type_matches_peft_merge(tmp_path, name, dtype):
    case = CASES[name]
    factory, summary, ours, base_dir, adapter_dir = run_case(tmp_path, name, dtype)
    ref = peft_merged_state(factory, adapter_dir)
    base = load_file(next(base_dir.glob("*.safetensors")))
    assert set(ours) == set(base) and set(ours) <= set(ref)
    changed = [key for key in ours if not torch.equal(ours[key], base[key])]
    assert changed and len(changed) == summary.tensors_edited
    budget = case.bf16 if dtype == torch.bfloat16 else 0.0
    for key, tensor in ours.items():
        if budget:
            at = torch.maximum(base[key].float().abs(), (tensor.float() - base[key].float()).abs())
            assert max_ulps(tensor, ref[key], at=at) <= budget, key
        else:
            assert torch.equal(tensor, ref[key]), f"{key}: {max_ulps(tensor, ref[key])} ulps from PEFT"
    if dtype == torch.float32:
        inputs = INPUTS.get(case.model, TOKENS)
        expected = peft_logits(factory, adapter_dir, inputs)
        network = factory()
        network.load_state_dict(ours, strict=case.model in INPUTS)
        assert torch.allclose(logits_of(network, inputs), expected, atol=1e-4)
        restored = revert_all(base_dir, [adapter_dir], ours)
        for key, tensor in restored.items():
            if case.undo_from_base:
                assert torch.equal(tensor, base[key]), key
            elif case.solved:
                error = (tensor - base[key]).abs().max()
                assert error <= 8 * torch.finfo(torch.float32).eps * base[key].abs().max(), key
            else:
                at = torch.maximum(base[key].abs(), ours[key].abs())
                assert max_ulps(tensor, base[key], at=at) <= case.undo_ulps, key


# What PEFT can merge but loractl cannot without information the files do not hold, refused by name and writing
# nothing: (model, config, error, message).
REFUSALS = {
    "beft_without_bias": (
        "llama",
        BeftConfig(target_modules=["q_proj"], init_weights=False),
        AdapterMismatchError,
        "has no bias, so its BEFT bias cannot be merged",
    ),
    "glora_bias_reads_weight": (
        "mlp",
        GloraConfig(r=2, target_modules=["fc1"], init_weights=False),
        UnsupportedAdapterError,
        "bias update adds W @ C",
    ),
    "tinylora_without_projections": (
        "llama",
        TinyLoraConfig(r=2, u=4, target_modules=["q_proj"], save_projection=False, init_weights=False),
        UnsupportedAdapterError,
        "saved without its projections",
    ),
    "frod_without_projections": (
        "llama",
        FrodConfig(target_modules=["q_proj"], save_projection=False, progressbar=False),
        UnsupportedAdapterError,
        "saved without its projections",
    ),
    "adamss_on_a_biased_layer": (
        "mlp",
        AdamssConfig(r=4, num_subspaces=2, target_modules=["fc2"], init_weights=None),
        UnsupportedAdapterError,
        "clusters \\[W \\| b\\]",
    ),
    "unilora_without_indices": (
        "llama",
        UniLoraConfig(r=2, theta_d_length=16, target_modules=["q_proj"]),
        UnsupportedAdapterError,
        "saved without its indices",
    ),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_what_the_files_cannot_tell_is_refused_by_name(tmp_path, name):
    model, config, error, message = REFUSALS[name]
    factory = functools.partial(FACTORIES[model], torch.float32)
    save_base(factory(), tmp_path / "base")
    make_adapter(factory, config, tmp_path / "adapter")
    with pytest.raises(error, match=message):
        merge(local_source(tmp_path / "base"), [AdapterSpec(local_source(tmp_path / "adapter"))], tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("corruption", ["index_too_large", "negative_index", "size_wrong", "indices_one_row"])
def test_a_corrupt_frod_sparse_matrix_is_one_line_exit_2(tmp_path: Path, corruption: str) -> None:
    """FRoD's sparse part is rebuilt by torch.sparse_coo_tensor, which raises RuntimeError on bad indices: each
    broken file is refused naming it before that (exit 3 was the result)."""
    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from lora_cli.cli.app import app

    _, _, _, base_dir, adapter_dir = run_case(tmp_path, "frod", torch.float32)
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    for key, value in list(tensors.items()):
        if "frod_s_indices" in key:
            value = value.clone()
            if corruption == "index_too_large":
                value[0, 0] = 10**6
            elif corruption == "negative_index":
                value[1, 0] = -3
            elif corruption == "indices_one_row":
                value = value[:1]
            tensors[key] = value
        elif "frod_s_size" in key and corruption == "size_wrong":
            tensors[key] = value * 3
    save_file(tensors, adapter_dir / "adapter_model.safetensors")
    out = tmp_path / "broken"
    result = CliRunner().invoke(app, ["merge", str(base_dir), str(adapter_dir), str(out), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "adapter" in lines[0] and "FRoD sparse" in lines[0], result.output
    assert not out.exists()
