"""loractl diff on tiny models built here: statuses, component counts, ranks, the adapter check, JSON, exit codes.

Tolerances: the diff compares stored values, so a merge's untouched tensors must come out `identical` with the
default torch.allclose tolerances and every adapted one `changed`. A loractl merge recomputed by `--adapter`
runs the same code on the same bytes, so its residual is 0 ulps; a PEFT CPU merge does the same operations
in the same order (tests/test_merge_vs_peft.py pins this), so it passes within the default 2-ulp bound.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import save_file
from typer.testing import CliRunner

from lora_cli.cli.app import app
from lora_cli.components import classify
from lora_cli.diff import DiffOptions, diff, difference_rank
from lora_cli.merge import merge
from lora_cli.sources import AdapterSpec, local_source
from tests.builders import make_adapter, save_base, tiny_gpt2, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]
RANK = 3
LAYERS = 2


def _merge(base: Path, adapter: Path, out: Path, **options) -> Path:
    from lora_cli.engine import WriteOptions

    merge(local_source(base), [AdapterSpec(local_source(adapter))], out, WriteOptions(device="cpu", **options))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A bf16 tiny Llama, a rank-3 LoRA on q/v/down, the loractl merge, a second adapter and a PEFT merge."""
    root = tmp_path_factory.mktemp("diff")
    factory = functools.partial(tiny_llama, torch.bfloat16)
    config = LoraConfig(r=RANK, lora_alpha=6, target_modules=TARGETS, init_lora_weights=False)
    paths = {name: root / name for name in ("base", "adapter", "other", "merged", "peft_merged", "sharded")}
    save_base(factory(), paths["base"])
    save_base(factory(), paths["sharded"], max_shard_size="20KB")
    make_adapter(factory, config, paths["adapter"], seed=1)
    make_adapter(factory, config, paths["other"], seed=2)
    _merge(paths["base"], paths["adapter"], paths["merged"])
    peft = PeftModel.from_pretrained(factory(), paths["adapter"]).merge_and_unload()
    peft.save_pretrained(paths["peft_merged"])
    return paths


def run_diff(a: Path, b: Path, **kwargs):
    adapters = kwargs.pop("adapters", None)
    specs = [AdapterSpec(local_source(p)) for p in adapters] if adapters else None
    return diff(local_source(a), local_source(b), DiffOptions(**kwargs), specs)


def adapted_names() -> set[str]:
    blocks = {"q_proj": "self_attn", "v_proj": "self_attn", "down_proj": "mlp"}
    return {f"model.layers.{i}.{blocks[m]}.{m}.weight" for i in range(LAYERS) for m in TARGETS}


def test_base_vs_merged_finds_exactly_the_adapted_tensors(models):
    result = run_diff(models["base"], models["merged"])
    changed = {r.name for r in result.tensors if r.status == "changed"}
    assert changed == adapted_names()
    assert result.summary["changed"] == 6
    assert result.summary["identical"] == len(result.tensors) - 6
    assert result.differ
    by_component = {c.component: (c.differ, c.tensors) for c in result.components}
    assert by_component["self-attention q"] == (2, 2)
    assert by_component["self-attention k"] == (0, 2)
    assert by_component["self-attention v"] == (2, 2)
    assert by_component["self-attention o"] == (0, 2)
    assert by_component["MLP down"] == (2, 2)
    assert by_component["MLP gate"] == (0, 2)
    assert by_component["norms"] == (0, 2 * LAYERS + 1)
    groups = {g.group: (g.matrices_differ, g.matrices) for g in result.groups}
    assert groups["self-attention"] == (4, 8)
    assert groups["MLP"] == (2, 6)
    assert [layer.differ for layer in result.layers if layer.layer is not None] == [3, 3]
    for record in result.tensors:
        if record.status == "changed":
            assert record.max_abs_diff > 0 and record.frac_differ > 0.5 and record.cosine < 1
        else:
            assert record.max_abs_diff == 0 and record.frac_differ == 0 and record.rel_frobenius == 0


def test_checkpoint_against_itself_exits_0_and_merged_exits_1(models):
    runner = CliRunner()
    same = runner.invoke(app, ["diff", str(models["base"]), str(models["base"]), "--json"])
    assert same.exit_code == 0, same.output
    assert json.loads(same.stdout)["summary"]["identical"] == len(json.loads(same.stdout)["tensors"])
    changed = runner.invoke(app, ["diff", str(models["base"]), str(models["merged"])])
    assert changed.exit_code == 1, changed.output
    assert "self-attention matrices: 4 of 8 differ" in changed.stdout
    missing = runner.invoke(app, ["diff", str(models["base"]), str(models["base"] / "nope")])
    assert missing.exit_code == 2 and "nope" in missing.output


def test_different_shard_layouts_compare_identical(models):
    assert len(list(models["sharded"].glob("*.safetensors"))) > 1
    result = run_diff(models["base"], models["sharded"])
    assert not result.differ and result.summary["identical"] == len(result.tensors)


def test_dtypes_are_compared_at_the_coarser_precision(tmp_path, models):
    save_base(tiny_llama(torch.float32), tmp_path / "fp32")
    save_base(tiny_llama(torch.float32).to(torch.bfloat16), tmp_path / "cast")
    cast = run_diff(tmp_path / "fp32", tmp_path / "cast")
    # The cast is the fp32 model rounded: the same values at bf16 precision, in another dtype.
    assert {r.status for r in cast.tensors} == {"dtype_mismatch"}
    assert all(r.max_abs_diff == 0 for r in cast.tensors)
    _merge(tmp_path / "fp32", models["adapter"], tmp_path / "merged", dtype="bfloat16")
    merged = run_diff(tmp_path / "fp32", tmp_path / "merged")
    assert {r.name for r in merged.tensors if r.status == "changed"} == adapted_names()
    assert {r.status for r in merged.tensors if r.name not in adapted_names()} == {"dtype_mismatch"}
    assert {r.dtype_a for r in merged.tensors} == {"float32"} and {r.dtype_b for r in merged.tensors} == {"bfloat16"}


def test_missing_extra_and_reshaped_tensors_and_tolerances(tmp_path):
    torch.manual_seed(0)
    w = torch.randn(8, 4)
    save_file({"fc1.weight": w, "fc2.weight": torch.ones(3), "gone.weight": torch.ones(2)}, tmp_path / "a.safetensors")
    (tmp_path / "a").mkdir()
    (tmp_path / "a.safetensors").rename(tmp_path / "a" / "model.safetensors")
    (tmp_path / "b").mkdir()
    within = w * (1 + 1e-7)  # well inside rtol=1e-5
    save_file(
        {"fc1.weight": within, "fc2.weight": torch.ones(4), "new.weight": torch.ones(2)},
        tmp_path / "b" / "model.safetensors",
    )
    result = run_diff(tmp_path / "a", tmp_path / "b")
    status = {r.name: r.status for r in result.tensors}
    assert status == {
        "fc1.weight": "identical",
        "fc2.weight": "shape_mismatch",
        "gone.weight": "only_in_a",
        "new.weight": "only_in_b",
    }
    fc1 = next(r for r in result.tensors if r.name == "fc1.weight")
    assert fc1.frac_differ > 0 and fc1.allclose  # identical means within tolerance, not bit-identical
    assert (fc1.layer, fc1.component) == (None, "other")
    strict = run_diff(tmp_path / "a", tmp_path / "b", rtol=0.0, atol=0.0)
    assert next(r for r in strict.tensors if r.name == "fc1.weight").status == "changed"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rank_of_a_lora_merge_is_r(tmp_path, dtype):
    factory = functools.partial(tiny_llama, dtype)
    save_base(factory(), tmp_path / "base")
    config = LoraConfig(r=RANK, lora_alpha=6, target_modules=["q_proj", "up_proj"], init_lora_weights=False)
    make_adapter(factory, config, tmp_path / "adapter", scale=0.1)
    _merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    result = run_diff(tmp_path / "base", tmp_path / "merged", rank=True)
    ranks = {r.name: r.rank for r in result.tensors if r.status == "changed"}
    assert len(ranks) == 2 * LAYERS and set(ranks.values()) == {RANK}
    assert all(r.rank is None for r in result.tensors if r.status != "changed")


def test_randomized_rank_estimate_ignores_bf16_rounding_noise():
    generator = torch.Generator().manual_seed(0)
    w = (torch.randn(700, 600, generator=generator) * 0.02).bfloat16()
    delta = torch.randn(700, 5, generator=generator) @ torch.randn(5, 600, generator=generator) * 1e-3
    merged = (w.float() + delta).bfloat16()
    d = merged.float() - w.float()
    # Half an ulp of bf16 at each merged value, as compare_tensors estimates the noise floor.
    half_ulp = torch.pow(2.0, torch.floor(torch.log2(merged.float().abs()))) * 2.0**-8
    noise = 2.0 * float(half_ulp.pow(2).mean().sqrt()) * (700**0.5 + 600**0.5)
    assert difference_rank(d, noise) == 5
    assert difference_rank(d, 0.0) > 5  # without the floor, rounding noise looks full rank


def test_adapter_check_passes_for_the_true_adapter_and_fails_for_another(models):
    ours = run_diff(models["base"], models["merged"], adapters=[models["adapter"]])
    check = ours.adapter_check
    assert check.verdict == "exact" and check.max_ulps == 0 and not check.problems
    assert (check.edited, check.untouched) == (6, len(ours.tensors) - 6)
    assert ours.provenance_b["operation"] == "merge"
    peft = run_diff(models["base"], models["peft_merged"], adapters=[models["adapter"]])
    assert peft.adapter_check.verdict in ("exact", "pass"), peft.adapter_check.problems
    other = run_diff(models["base"], models["merged"], adapters=[models["other"]])
    assert other.adapter_check.verdict == "fail"
    assert other.adapter_check.max_ulps > 10  # another adapter is far outside any rounding
    assert len(other.adapter_check.problems) == 6


def test_adapter_check_exit_codes(models):
    runner = CliRunner()
    good = runner.invoke(app, ["diff", str(models["base"]), str(models["merged"]), "--adapter", str(models["adapter"])])
    assert good.exit_code == 0, good.output
    assert "EXACT" in good.stdout and "provenance" in good.stdout
    bad = runner.invoke(app, ["diff", str(models["base"]), str(models["merged"]), "--adapter", str(models["other"])])
    assert bad.exit_code == 1, bad.output
    assert "FAIL" in bad.stdout


def test_json_schema(models):
    result = CliRunner().invoke(app, ["diff", str(models["base"]), str(models["merged"]), "--json", "--rank", "--all"])
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert set(data) >= {"a", "b", "tensors", "summary", "components", "groups", "layers", "differ"}
    assert set(data["summary"]) == {
        "changed",
        "identical",
        "only_in_a",
        "only_in_b",
        "shape_mismatch",
        "dtype_mismatch",
    }
    assert data["summary"]["changed"] == 6
    record = next(r for r in data["tensors"] if r["status"] == "changed")
    for key in ("name", "status", "max_abs_diff", "rel_frobenius", "frac_differ", "allclose", "cosine", "rank"):
        assert key in record
    assert record["rank"] == RANK and record["allclose"] is False
    component = next(c for c in data["components"] if c["component"] == "MLP down")
    assert component["differ"] == 2 and component["ranks"] == [RANK]


@pytest.mark.parametrize(
    ("name", "layer", "component"),
    [
        ("model.layers.7.self_attn.q_proj.weight", 7, "self-attention q"),
        ("model.layers.0.mlp.gate_proj.weight", 0, "MLP gate"),
        ("model.layers.3.post_attention_layernorm.weight", 3, "norms"),
        ("model.embed_tokens.weight", None, "embeddings"),
        ("lm_head.weight", None, "head"),
        ("transformer.h.2.attn.c_attn.weight", 2, "self-attention qkv"),
        ("transformer.h.2.attn.c_proj.bias", 2, "self-attention o"),
        ("transformer.h.1.mlp.c_fc.weight", 1, "MLP up"),
        ("transformer.h.1.mlp.c_proj.weight", 1, "MLP down"),
        ("transformer.h.0.ln_1.weight", 0, "norms"),
        ("transformer.wpe.weight", None, "embeddings"),
        ("fc1.weight", None, "other"),
    ],
)
def test_components_from_names(name, layer, component):
    place = classify(name)
    assert (place.layer, place.component) == (layer, component)


def test_gpt2_state_dict_groups(tmp_path):
    save_base(tiny_gpt2(), tmp_path / "gpt2")
    result = run_diff(tmp_path / "gpt2", tmp_path / "gpt2")
    components = {c.component for c in result.components}
    assert {"self-attention qkv", "self-attention o", "MLP up", "MLP down", "embeddings", "norms"} <= components


def test_adapter_check_of_stacked_adapters(tmp_path, models):
    factory = functools.partial(tiny_llama, torch.bfloat16)
    make_adapter(factory, LoraConfig(r=2, target_modules=["v_proj", "up_proj"]), tmp_path / "second", seed=4)
    merge(
        local_source(models["base"]),
        [AdapterSpec(local_source(models["adapter"])), AdapterSpec(local_source(tmp_path / "second"))],
        tmp_path / "stacked",
    )
    both = run_diff(models["base"], tmp_path / "stacked", adapters=[models["adapter"], tmp_path / "second"])
    # v_proj carries both deltas: recomputed in merge's order, it is bit-identical.
    assert both.adapter_check.verdict == "exact", both.adapter_check.problems
    one = run_diff(models["base"], tmp_path / "stacked", adapters=[models["adapter"]])
    assert one.adapter_check.verdict == "fail"
    assert any("v_proj" in p for p in one.adapter_check.problems)
    assert any("up_proj" in p and "do not touch" in p for p in one.adapter_check.problems)


def test_adapter_check_of_an_untied_head(tmp_path):
    factory = functools.partial(tiny_llama, torch.bfloat16, tie_word_embeddings=True)
    save_base(factory(), tmp_path / "base")
    config = LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False)
    make_adapter(factory, config, tmp_path / "adapter", scale=0.2)
    _merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    result = run_diff(tmp_path / "base", tmp_path / "merged", adapters=[tmp_path / "adapter"])
    # The merge wrote lm_head.weight apart from the tied embedding: B has it, A does not, and the plan expects it.
    assert next(r for r in result.tensors if r.name == "lm_head.weight").status == "only_in_b"
    assert result.adapter_check.verdict == "exact", result.adapter_check.problems
