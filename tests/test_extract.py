"""`loractl extract`: round trips through merge, PEFT loading the written adapter, per-module ranks, the tensors
that go to modules_to_save or lora_bias, and bad input.

Tolerances. A rank-r delta extracted at rank r by an fp32 SVD comes back within a few ulps of the delta's own
magnitude (the SVD is backward stable: error ~ eps * ||delta||); merged again, each weight lands within
2 fp32 ulps at the larger of its magnitude and the delta's (we count ulps at the larger operand). In bf16 the
extracted delta also holds the merged file's rounding, so the second merge may round to the neighbouring bf16
value: at most 1 bf16 ulp, on a small share of entries. Logits through PEFT: fp32 compute of a 2-layer model,
atol 1e-4 (the factors differ, so the sums are ordered differently).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lora_cli.cli.app import app
from lora_cli.extract import ExtractOptions, extract
from lora_cli.lowrank import Truncation
from lora_cli.merge import merge
from lora_cli.numerics import ulps
from lora_cli.sources import AdapterSpec, local_source
from tests.builders import MLP, load_merged, logits_of, make_adapter, save_base, tiny_gpt2, tiny_llama, tiny_mlp

runner = CliRunner()
INPUTS = torch.tensor([[1, 5, 9, 33, 70, 2, 11, 4]])


def loractl_merge(base: Path, adapter: Path, out: Path) -> dict[str, torch.Tensor]:
    merge(local_source(base), [AdapterSpec(local_source(adapter))], out)
    return load_merged(out)


def options(**kwargs) -> ExtractOptions:
    truncation = Truncation(
        rank=kwargs.pop("rank", None), energy=kwargs.pop("energy", None), max_rank=kwargs.pop("max_rank", None)
    )
    return ExtractOptions(truncation=truncation, device="cpu", **kwargs)


def model_from(factory, state: dict[str, torch.Tensor]):
    model = factory()
    model.load_state_dict(state, strict=False)
    return model


@pytest.fixture(scope="module")
def fp32_merge(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("extract32")
    save_base(tiny_llama(), root / "base")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "gate_proj"])
    make_adapter(tiny_llama, config, root / "lora", scale=0.3)
    loractl_merge(root / "base", root / "lora", root / "merged")
    return root


def test_round_trip_at_the_adapters_rank_gives_the_merge_back(fp32_merge, tmp_path):
    root = fp32_merge
    summary = extract(root / "base", root / "merged", tmp_path / "ex", options(rank=4))
    assert {m.rank for m in summary.modules} == {4}
    assert len(summary.modules) == 8 and all(m.role == "lora" for m in summary.modules)
    assert summary.energy_kept > 1 - 1e-9
    assert summary.relative_error < 1e-5
    config = json.loads((tmp_path / "ex" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 4 and not config["rank_pattern"]
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "q_proj", "v_proj"]

    first = load_merged(root / "merged")
    second = loractl_merge(root / "base", tmp_path / "ex", tmp_path / "again")
    base = load_merged(root / "base")
    worst = 0.0
    for name, tensor in first.items():
        delta = tensor - base[name]
        if not delta.any():
            assert torch.equal(second[name], tensor), name
            continue
        # The SVD's backward error is a small multiple of eps * ||delta||_2 (spectral norm).
        bound = torch.finfo(torch.float32).eps * float(torch.linalg.matrix_norm(delta, ord=2))
        worst = max(worst, float((second[name] - tensor).abs().max()) / bound)
    assert worst <= 4, worst


def test_peft_loads_the_extracted_adapter_and_gives_the_tuned_logits(fp32_merge, tmp_path):
    root = fp32_merge
    extract(root / "base", root / "merged", tmp_path / "ex", options(rank=4))
    tuned = logits_of(model_from(tiny_llama, load_merged(root / "merged")), INPUTS)
    model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "ex").eval()
    torch.testing.assert_close(logits_of(model, INPUTS), tuned, atol=1e-4, rtol=0)


def test_energy_gives_per_module_ranks_in_rank_pattern_that_peft_applies(tmp_path):
    save_base(tiny_llama(), tmp_path / "base")
    state = load_merged(tmp_path / "base")
    generator = torch.Generator().manual_seed(3)
    ranks = {
        "model.layers.0.self_attn.q_proj": 2,
        "model.layers.1.mlp.up_proj": 5,
        "model.layers.1.self_attn.o_proj": 3,
    }
    for module, rank in ranks.items():
        weight = state[f"{module}.weight"]
        b = torch.randn(weight.shape[0], rank, generator=generator)
        a = torch.randn(rank, weight.shape[1], generator=generator)
        state[f"{module}.weight"] = weight + 0.05 * (b @ a)
    tuned = tmp_path / "tuned"
    save_base(model_from(tiny_llama, state), tuned)

    summary = extract(tmp_path / "base", tuned, tmp_path / "ex", options(energy=0.999999))
    assert {m.tensor.removesuffix(".weight"): m.rank for m in summary.modules} == ranks
    config = json.loads((tmp_path / "ex" / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(ranks)  # only some q_proj are changed: full paths, exact
    assert config["rank_pattern"] == {m: r for m, r in ranks.items() if r != config["r"]}
    assert config["alpha_pattern"] == config["rank_pattern"]
    model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "ex").eval()
    expected = logits_of(model_from(tiny_llama, state), INPUTS)
    torch.testing.assert_close(logits_of(model, INPUTS), expected, atol=1e-4, rtol=0)

    capped = extract(tmp_path / "base", tuned, tmp_path / "capped", options(energy=0.999999, max_rank=3))
    assert max(m.rank for m in capped.modules) == 3
    assert next(m for m in capped.modules if "up_proj" in m.tensor).energy_kept < 0.999


def test_bf16_round_trip_lands_within_one_ulp_of_the_merge(tmp_path):
    factory = functools.partial(tiny_llama, torch.bfloat16)
    save_base(factory(), tmp_path / "base")
    make_adapter(factory, LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "up_proj"]), tmp_path / "lora")
    first = loractl_merge(tmp_path / "base", tmp_path / "lora", tmp_path / "merged")
    extract(tmp_path / "base", tmp_path / "merged", tmp_path / "ex", options(rank=4))
    second = loractl_merge(tmp_path / "base", tmp_path / "ex", tmp_path / "again")
    base = load_merged(tmp_path / "base")
    changed = total = 0
    for name, tensor in first.items():
        assert second[name].dtype == torch.bfloat16
        diff = ulps(second[name], tensor, at=(tensor.float() - base[name].float()).abs().max().expand(tensor.shape))
        assert int(diff.max()) <= 1, name
        changed += int((diff > 0).sum())
        total += tensor.numel()
    assert changed < total * 0.1  # measured: 3.8% of the entries one ulp away


def test_changed_norms_embeddings_and_resized_vocab_go_to_modules_to_save(tmp_path):
    save_base(tiny_llama(), tmp_path / "base")
    state = load_merged(tmp_path / "base")
    state["model.norm.weight"] = state["model.norm.weight"] * 1.5
    state["model.embed_tokens.weight"] = torch.cat([state["model.embed_tokens.weight"], torch.randn(4, 32)])
    state["lm_head.weight"] = torch.cat([state["lm_head.weight"], torch.randn(4, 32)])
    state["model.layers.1.self_attn.k_proj.weight"] += 0.01
    tuned = tmp_path / "tuned"
    tuned.mkdir()
    save_file(state, tuned / "model.safetensors")
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    (tuned / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 4}))

    summary = extract(tmp_path / "base", tuned, tmp_path / "ex", options(energy=0.9999))
    roles = {m.tensor: m.role for m in summary.modules}
    assert roles == {
        "model.norm.weight": "modules_to_save",
        "model.embed_tokens.weight": "modules_to_save",
        "lm_head.weight": "modules_to_save",
        "model.layers.1.self_attn.k_proj.weight": "lora",
    }
    assert next(m for m in summary.modules if m.role == "lora").rank == 1  # a constant shift has rank 1
    assert sum("resize the base's embeddings" in w for w in summary.warnings) == 2
    written = load_file(tmp_path / "ex" / "adapter_model.safetensors")
    assert torch.equal(written["base_model.model.lm_head.weight"], state["lm_head.weight"])
    adapter = json.loads((tmp_path / "ex" / "adapter_config.json").read_text())
    assert sorted(adapter["modules_to_save"]) == ["lm_head", "model.embed_tokens", "model.norm"]

    base = tiny_llama()
    base.resize_token_embeddings(config["vocab_size"] + 4)
    model = PeftModel.from_pretrained(base, tmp_path / "ex").eval()
    expected = logits_of(model_from(functools.partial(tiny_llama, vocab_size=config["vocab_size"] + 4), state), INPUTS)
    torch.testing.assert_close(logits_of(model, INPUTS), expected, atol=1e-4, rtol=0)


def test_conv1d_layers_are_extracted_transposed_with_fan_in_fan_out(tmp_path):
    save_base(tiny_gpt2(), tmp_path / "base")
    config = LoraConfig(r=3, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    make_adapter(tiny_gpt2, config, tmp_path / "lora", scale=0.3)
    state = loractl_merge(tmp_path / "base", tmp_path / "lora", tmp_path / "merged")
    extract(tmp_path / "base", tmp_path / "merged", tmp_path / "ex", options(rank=3))
    adapter = json.loads((tmp_path / "ex" / "adapter_config.json").read_text())
    assert adapter["fan_in_fan_out"] is True and sorted(adapter["target_modules"]) == ["c_attn", "c_fc"]
    model = PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "ex").eval()
    tuned = model_from(tiny_gpt2, state)
    torch.testing.assert_close(logits_of(model, INPUTS), logits_of(tuned, INPUTS), atol=1e-4, rtol=0)


def test_a_changed_bias_rides_on_lora_bias_or_saves_its_module(tmp_path):
    base = tiny_mlp()
    save_base(base, tmp_path / "base")
    state = {k: v.clone() for k, v in base.state_dict().items()}
    generator = torch.Generator().manual_seed(5)
    state["fc2.weight"] += 0.1 * torch.randn(24, 2, generator=generator) @ torch.randn(2, 24, generator=generator)
    state["fc2.bias"] += 0.1
    state["head.bias"] -= 0.2  # its weight unchanged: the module is saved whole
    tuned = tmp_path / "tuned"
    tuned.mkdir()
    save_file(state, tuned / "model.safetensors")
    summary = extract(tmp_path / "base", tuned, tmp_path / "ex", options(rank=2))
    assert {m.tensor: m.role for m in summary.modules} == {
        "fc2.weight": "lora",
        "fc2.bias": "lora_bias",
        "head.bias": "modules_to_save",
    }
    adapter = json.loads((tmp_path / "ex" / "adapter_config.json").read_text())
    assert adapter["lora_bias"] is True and adapter["modules_to_save"] == ["head"] and adapter["task_type"] is None
    model = PeftModel.from_pretrained(tiny_mlp(), tmp_path / "ex").eval()
    x = torch.randn(3, 16, generator=generator)
    expected = model_from(tiny_mlp, state)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected(x), atol=1e-5, rtol=0)
    assert isinstance(expected, MLP)


def test_include_and_exclude_select_modules(fp32_merge, tmp_path):
    root = fp32_merge
    chosen = options(rank=4, include=("self_attn",), exclude=(r"layers\.0\.",))
    summary = extract(root / "base", root / "merged", tmp_path / "ex", chosen)
    assert sorted(m.tensor for m in summary.modules) == [
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.self_attn.v_proj.weight",
    ]
    config = json.loads((tmp_path / "ex" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_cli_reports_json_and_refuses_bad_input_in_one_line(fp32_merge, tmp_path):
    root = fp32_merge
    args = ["extract", str(root / "base"), str(root / "merged"), str(tmp_path / "ex"), "-r", "2", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["config"]["r"] == 2 and 0 < report["energy_kept"] < 1
    assert {m["rank"] for m in report["modules"]} == {2}
    for args, needle in [
        (["--rank", "2", "--energy", "0.5"], "exactly one of --rank and --energy"),
        (["--energy", "1.5"], "--energy 1.5"),
        (["--rank", "2", "--include", "("], "not a regular expression"),
    ]:
        out = tmp_path / "bad"
        result = runner.invoke(app, ["extract", str(root / "base"), str(root / "merged"), str(out), *args])
        assert result.exit_code == 2 and needle in result.output and "Traceback" not in result.output, result.output
        assert not out.exists()
    same = runner.invoke(app, ["extract", str(root / "base"), str(root / "base"), str(tmp_path / "same"), "-r", "2"])
    assert same.exit_code == 2 and "nothing to extract" in same.output
    assert not (tmp_path / "same").exists() and not list(tmp_path.glob(".same*"))
    exists = runner.invoke(app, ["extract", str(root / "base"), str(root / "merged"), str(tmp_path / "ex"), "-r", "2"])
    assert exists.exit_code == 2 and "already exists" in exists.output


@pytest.mark.cuda
def test_extract_on_cuda_gives_the_adapter_the_cpu_gives(fp32_merge, tmp_path):
    root = fp32_merge
    cpu = extract(root / "base", root / "merged", tmp_path / "cpu", options(rank=4))
    gpu_options = ExtractOptions(truncation=Truncation(rank=4), device="cuda")
    gpu = extract(root / "base", root / "merged", tmp_path / "gpu", gpu_options)
    assert gpu.device.startswith("cuda") and gpu.peak_gpu_bytes
    assert [m.rank for m in gpu.modules] == [m.rank for m in cpu.modules]
    assert gpu.relative_error < 1e-5
    expected = PeftModel.from_pretrained(tiny_llama(), tmp_path / "cpu").eval()
    model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "gpu").eval()
    torch.testing.assert_close(logits_of(model, INPUTS), logits_of(expected, INPUTS), atol=1e-4, rtol=0)
