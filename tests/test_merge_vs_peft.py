"""loractl merge against PEFT's merge_and_unload on tiny models built here: same tensors, same logits.

Tolerances: PEFT on CPU computes `(B @ A) * scaling` in fp32 and adds it to the weight with one rounding; loractl
does the same operations in the same order, so merged Linear weights are compared for exact equality. Where
PEFT rounds twice (embeddings in bf16: it casts the delta to bf16 before adding) loractl rounds once, so those
are allowed 1 ulp, counted at the larger magnitude. Logits are compared with the unmerged PeftModel, whose
forward sums in another order: 1e-4 absolute in fp32.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file

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

LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
INPUTS = torch.tensor([[1, 5, 9, 17, 33, 2, 70, 11], [3, 3, 40, 41, 8, 90, 0, 12]])


def run_case(tmp_path: Path, factory, config, *, max_shard_size: str | None = None, **merge_kwargs):
    base_dir, adapter_dir, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "out"
    save_base(factory(), base_dir, max_shard_size=max_shard_size)
    make_adapter(factory, config, adapter_dir)
    summary = merge(local_source(base_dir), [AdapterSpec(local_source(adapter_dir))], out, **merge_kwargs)
    return summary, load_merged(out), peft_merged_state(factory, adapter_dir), out, adapter_dir


def assert_same_tensors(
    ours: dict, ref: dict, *, ulp_budget: dict[str, float] | None = None, base: dict | None = None
) -> None:
    """Exact equality, or within `ulp_budget` ulps counted at the larger of the base weight and the delta."""
    assert set(ours) <= set(ref), set(ours) - set(ref)
    for name, tensor in ours.items():
        expected = ref[name].to(tensor.dtype)
        budget = next((b for key, b in (ulp_budget or {}).items() if key in name), 0.0)
        if budget == 0.0:
            assert torch.equal(tensor, expected), f"{name}: max ulps {max_ulps(tensor, expected)}"
        else:
            original = base[name].float()
            operands = torch.maximum(original.abs(), (tensor.float() - original).abs())
            assert max_ulps(tensor, expected, at=operands) <= budget, name


def transformers_logits(out: Path, dtype: torch.dtype) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    return logits_of(AutoModelForCausalLM.from_pretrained(out, dtype=dtype), INPUTS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lora_on_every_linear_is_bit_identical_to_peft(tmp_path, dtype):
    factory = functools.partial(tiny_llama, dtype)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_LINEARS, init_lora_weights=False)
    summary, ours, ref, out, adapter = run_case(tmp_path, factory, config)
    assert summary.tensors_edited == 2 * len(LLAMA_LINEARS)
    assert set(ours) == set(ref)
    assert_same_tensors(ours, ref)
    if dtype == torch.float32:
        expected = peft_logits(factory, adapter, INPUTS)
        assert torch.allclose(transformers_logits(out, dtype), expected, atol=1e-4)


def test_rslora_with_rank_and_alpha_patterns(tmp_path):
    factory = functools.partial(tiny_llama, torch.bfloat16)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 6},
        alpha_pattern={"down_proj": 3},
        init_lora_weights=False,
    )
    summary, ours, ref, _, _ = run_case(tmp_path, factory, config)
    assert summary.tensors_edited == 6
    assert_same_tensors(ours, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dora_matches_peft(tmp_path, dtype):
    factory = functools.partial(tiny_llama, dtype)
    config = LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "up_proj"], init_lora_weights=False)
    _, ours, ref, out, adapter = run_case(tmp_path, factory, config)
    assert_same_tensors(ours, ref)
    if dtype == torch.float32:
        assert torch.allclose(transformers_logits(out, dtype), peft_logits(factory, adapter, INPUTS), atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lora_on_embed_tokens_and_lm_head(tmp_path, dtype):
    factory = functools.partial(tiny_llama, dtype)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "q_proj"], init_lora_weights=False
    )
    _, ours, ref, out, adapter = run_case(tmp_path, factory, config)
    # PEFT casts an embedding's delta to bf16 before adding it (two roundings); loractl rounds once. Each rounding
    # is at most half an ulp of its operand, so they differ by at most 1 ulp at the larger operand.
    base = load_file(tmp_path / "base" / "model.safetensors")
    assert_same_tensors(ours, ref, ulp_budget={"embed_tokens": 1.0}, base=base)
    if dtype == torch.float32:
        assert torch.allclose(transformers_logits(out, dtype), peft_logits(factory, adapter, INPUTS), atol=1e-4)


def test_modules_to_save_replaces_head_and_bias(tmp_path):
    factory = tiny_gpt2
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn"], modules_to_save=["lm_head", "ln_f"], init_lora_weights=False
    )
    _, ours, ref, out, adapter = run_case(tmp_path, factory, config)
    assert_same_tensors(ours, ref)
    assert not torch.equal(ours["transformer.ln_f.bias"], factory().state_dict()["transformer.ln_f.bias"])
    assert torch.allclose(transformers_logits(out, torch.float32), peft_logits(factory, adapter, INPUTS), atol=1e-4)


def test_fan_in_fan_out_conv1d_gpt2(tmp_path):
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, init_lora_weights=False
    )
    summary, ours, ref, out, adapter = run_case(tmp_path, tiny_gpt2, config)
    assert summary.tensors_edited == 2 * 4
    assert_same_tensors(ours, ref)
    assert torch.allclose(transformers_logits(out, torch.float32), peft_logits(tiny_gpt2, adapter, INPUTS), atol=1e-4)


def test_sharded_base_keeps_its_layout(tmp_path):
    factory = functools.partial(tiny_llama, torch.bfloat16)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_LINEARS, init_lora_weights=False)
    summary, ours, ref, out, _ = run_case(tmp_path, factory, config, max_shard_size="20KB")
    base_files = sorted(p.name for p in (tmp_path / "base").glob("*.safetensors"))
    assert len(base_files) > 2
    assert sorted(summary.files) == base_files
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ours.values())
    assert_same_tensors(ours, ref)


def test_plain_mlp_state_dict_without_config(tmp_path):
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"], lora_bias=True, init_lora_weights=False)
    _, ours, ref, out, adapter = run_case(tmp_path, tiny_mlp, config)
    assert not (out / "config.json").exists()
    assert_same_tensors(ours, ref)
    model = tiny_mlp()
    model.load_state_dict(ours)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(logits_of(model, x), peft_logits(tiny_mlp, adapter, x), atol=1e-5)


def test_tied_head_is_untied_when_the_adapter_changes_it(tmp_path):
    factory = functools.partial(tiny_llama, torch.float32, tie_word_embeddings=True)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"], init_lora_weights=False)
    base_dir, adapter_dir, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "out"
    save_base(factory(), base_dir)
    assert "lm_head.weight" not in load_file(base_dir / "model.safetensors")
    make_adapter(factory, config, adapter_dir)
    summary = merge(local_source(base_dir), [AdapterSpec(local_source(adapter_dir))], out)
    assert summary.config_changes["tie_word_embeddings"] is False
    assert any("tie" in w for w in summary.warnings)
    merged = load_merged(out)
    base = load_file(base_dir / "model.safetensors")
    # The input embedding is untouched; the head is the embedding plus the head's LoRA.
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert not torch.equal(merged["lm_head.weight"], base["model.embed_tokens.weight"])
    # PEFT's merge_and_unload would change the shared tensor (and so the embedding); the unmerged model is the truth.
    assert torch.allclose(transformers_logits(out, torch.float32), peft_logits(factory, adapter_dir, INPUTS), atol=1e-4)


def test_tied_embedding_lora_keeps_the_original_head(tmp_path):
    factory = functools.partial(tiny_llama, torch.float32, tie_word_embeddings=True)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"], init_lora_weights=False)
    base_dir, adapter_dir, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "out"
    save_base(factory(), base_dir)
    make_adapter(factory, config, adapter_dir)
    merge(local_source(base_dir), [AdapterSpec(local_source(adapter_dir))], out)
    merged = load_merged(out)
    base = load_file(base_dir / "model.safetensors")
    assert torch.equal(merged["lm_head.weight"], base["model.embed_tokens.weight"])
    assert torch.allclose(transformers_logits(out, torch.float32), peft_logits(factory, adapter_dir, INPUTS), atol=1e-4)


def test_trainable_token_rows_replace_rows_and_stay_tied(tmp_path):
    factory = functools.partial(tiny_llama, torch.float32, tie_word_embeddings=True)
    config = LoraConfig(r=4, target_modules=["v_proj"], trainable_token_indices=[1, 5, 7], init_lora_weights=False)
    _, ours, ref, out, adapter = run_case(tmp_path, factory, config)
    assert "lm_head.weight" not in ours
    assert_same_tensors(ours, ref)
    assert torch.allclose(transformers_logits(out, torch.float32), peft_logits(factory, adapter, INPUTS), atol=1e-4)


def test_resized_vocabulary_gives_new_shapes_and_vocab_size(tmp_path):
    def resized():
        model = tiny_llama(torch.float32)
        model.resize_token_embeddings(104)
        return model

    base_dir, adapter_dir, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "out"
    save_base(tiny_llama(torch.float32), base_dir)
    config = LoraConfig(
        r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"], init_lora_weights=False
    )
    make_adapter(resized, config, adapter_dir)
    summary = merge(local_source(base_dir), [AdapterSpec(local_source(adapter_dir))], out)
    merged = load_merged(out)
    assert merged["model.embed_tokens.weight"].shape[0] == 104
    assert merged["lm_head.weight"].shape[0] == 104
    assert summary.config_changes["vocab_size"] == 104
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 104
    assert_same_tensors(merged, peft_merged_state(resized, adapter_dir))


def test_adapter_saved_as_bin_is_read_with_weights_only(tmp_path):
    factory = tiny_mlp
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["fc1"], init_lora_weights=False)
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    save_base(factory(), base_dir)
    model = make_adapter(factory, config, adapter_dir)
    state = load_file(adapter_dir / "adapter_model.safetensors")
    (adapter_dir / "adapter_model.safetensors").unlink()
    torch.save(state, adapter_dir / "adapter_model.bin")
    merge(local_source(base_dir), [AdapterSpec(local_source(adapter_dir))], tmp_path / "out")
    ours = load_merged(tmp_path / "out")
    ref = {k: v for k, v in model.merge_and_unload().state_dict().items()}
    assert_same_tensors(ours, ref)


def test_dtype_option_converts_and_updates_config(tmp_path):
    factory = functools.partial(tiny_llama, torch.bfloat16)
    config = LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    base_dir, adapter_dir, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "out"
    save_base(factory(), base_dir)
    make_adapter(factory, config, adapter_dir)
    merge(local_source(base_dir), [AdapterSpec(local_source(adapter_dir))], out, options=_options(dtype="float32"))
    merged = load_merged(out)
    assert {t.dtype for t in merged.values()} == {torch.float32}
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    # Untouched tensors are widened exactly.
    base = load_file(base_dir / "model.safetensors")
    assert torch.equal(merged["model.norm.weight"], base["model.norm.weight"].float())


def _options(**kwargs):
    from lora_cli.engine import WriteOptions

    return WriteOptions(**kwargs)
