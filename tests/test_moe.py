"""Mixture-of-experts checkpoints: PEFT adapts the fused run-time expert stacks, the checkpoint stores experts apart.

Each case is compared with PEFT's `merge_and_unload` followed by transformers' `save_pretrained` (which splits the
stacks back into the stored layout), tensor for tensor, and the merged checkpoint's logits with the unmerged
PeftModel's. Tolerances: tensors exact in fp32 and bf16, because loractl computes each expert's delta with PEFT's
own einsum in fp32, rounds it to the weight's dtype as PEFT does, then adds; logits 1e-4 absolute in fp32 (the
unmerged forward adds the LoRA path in another order).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file, save_file
from torch import nn

from lora_cli.errors import AdapterMismatchError
from lora_cli.merge import merge
from lora_cli.numerics import max_ulps
from lora_cli.sources import AdapterSpec, local_source
from tests.builders import load_merged, logits_of, make_adapter, peft_logits
from tests.builders_models import MOES, build

INPUTS = torch.tensor([[1, 5, 9, 17, 33, 2, 70, 11], [3, 3, 40, 41, 8, 90, 0, 12]])
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
CONFIGS = {
    # the config lists down before gate_up: PEFT nests by registration order, not by this list
    "qwen3_moe": dict(target_parameters=[*EXPERTS[::-1], "mlp.gate.weight"], target_modules=["q_proj"]),
    # PEFT rewrites w1/w3/w2 into gate_up_proj/down_proj (rank_pattern 2r) and `gate` into `gate.weight`
    "mixtral": dict(target_modules=["w1", "w2", "w3", "gate", "q_proj"]),
    "gpt_oss": dict(target_parameters=[*EXPERTS, "mlp.router.weight"], target_modules=["q_proj"]),
}


def prepare(tmp_path: Path, name: str, dtype: torch.dtype, config: LoraConfig):
    factory = functools.partial(build, MOES, name, dtype)
    factory().save_pretrained(tmp_path / "base")
    make_adapter(factory, config, tmp_path / "adapter", scale=0.3)
    return factory


def merge_both(tmp_path: Path, factory) -> tuple[dict, dict, dict]:
    merge(local_source(tmp_path / "base"), [AdapterSpec(local_source(tmp_path / "adapter"))], tmp_path / "out")
    PeftModel.from_pretrained(factory(), tmp_path / "adapter").merge_and_unload().save_pretrained(tmp_path / "ref")
    return load_merged(tmp_path / "out"), load_merged(tmp_path / "ref"), load_merged(tmp_path / "base")


def assert_exact(ours: dict, ref: dict, base: dict) -> set[str]:
    assert set(ours) == set(ref) == set(base)  # the base's on-disk layout is kept
    for key, tensor in ours.items():
        assert torch.equal(tensor, ref[key]), f"{key}: {max_ulps(tensor, ref[key])} ulps"
    return {k for k in ours if not torch.equal(ours[k], base[k])}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_moe_target_parameters_merge_matches_peft(tmp_path, name, dtype):
    factory = prepare(tmp_path, name, dtype, LoraConfig(r=2, lora_alpha=4, **CONFIGS[name]))
    ours, ref, base = merge_both(tmp_path, factory)
    changed = assert_exact(ours, ref, base)
    stored_experts = {k for k in base if ".experts." in k and not k.endswith("_bias")}
    assert stored_experts <= changed  # every expert of every layer, whatever the stored layout
    assert sum(".self_attn.q_proj.weight" in k for k in changed) == 2
    assert sum(k.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight", "router.weight")) for k in changed) == 2
    if dtype == torch.float32:
        merged = type(factory()).from_pretrained(tmp_path / "out")
        expected = peft_logits(factory, tmp_path / "adapter", INPUTS)
        assert torch.allclose(logits_of(merged, INPUTS), expected, atol=1e-4)


def _zero_rows_of_b(adapter: Path, suffix: str, rows: slice) -> None:
    """Keep the delta of only part of a fused parameter: zero those rows of its lora_B (its output units)."""
    path = adapter / "adapter_model.safetensors"
    state = load_file(path)
    for key in state:
        if key.endswith(suffix):
            state[key][rows] = 0
    save_file(state, path)


@pytest.mark.parametrize(
    "name,gate_only,gate,up",
    [
        # gate_up_proj runs as [E, 2I, H]: rows [0, I) are gate, [I, 2I) up; stored as gate_proj / up_proj (w1 / w3)
        ("qwen3_moe", slice(8, 16), "gate_proj", "up_proj"),
        ("mixtral", slice(32, 64), ".w1.", ".w3."),
    ],
)
def test_a_delta_on_gate_only_changes_only_gate_tensors(tmp_path, name, gate_only, gate, up):
    config = LoraConfig(r=2, lora_alpha=4, target_parameters=["mlp.experts.gate_up_proj"])
    factory = prepare(tmp_path, name, torch.float32, config)
    _zero_rows_of_b(tmp_path / "adapter", "experts.lora_B.weight", gate_only)
    ours, ref, base = merge_both(tmp_path, factory)
    changed = assert_exact(ours, ref, base)
    assert changed and all(gate in k for k in changed), changed
    assert len(changed) == 2 * 4  # two layers, four experts
    assert not any(up in k and not torch.equal(ours[k], base[k]) for k in ours)


def test_gpt_oss_interleaved_gate_only_changes_only_even_columns(tmp_path):
    """gpt-oss stores gate_up_proj fused as it runs, [E, H, 2I], gate at ::2 and up at 1::2."""
    config = LoraConfig(r=2, lora_alpha=4, target_parameters=["mlp.experts.gate_up_proj"])
    factory = prepare(tmp_path, "gpt_oss", torch.float32, config)
    _zero_rows_of_b(tmp_path / "adapter", "experts.lora_B.weight", slice(1, None, 2))
    ours, ref, base = merge_both(tmp_path, factory)
    changed = assert_exact(ours, ref, base)
    assert changed == {f"model.layers.{i}.mlp.experts.gate_up_proj" for i in range(2)}
    for key in changed:
        assert torch.equal(ours[key][..., 1::2], base[key][..., 1::2])
        assert not torch.equal(ours[key][..., ::2], base[key][..., ::2])


def test_shared_experts_and_routed_experts_together(tmp_path):
    """Qwen2-MoE: LoRA on the shared expert's linears (modules) and on the routed experts' stacks (parameters)."""
    config = LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=["shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj"],
        target_parameters=EXPERTS,
    )
    factory = prepare(tmp_path, "qwen2_moe", torch.float32, config)
    ours, ref, base = merge_both(tmp_path, factory)
    changed = assert_exact(ours, ref, base)
    assert sum("shared_expert." in k for k in changed) == 2 * 3
    assert sum(".experts." in k for k in changed) == 2 * 4 * 3


class StoredLayout(nn.Module):
    """A module tree shaped like a checkpoint's stored names, each 2-D weight a Linear: the per-expert module
    layout of older transformers, where PEFT targets `experts.N.gate_proj` with `target_modules`."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for key, tensor in state.items():
            *path, leaf = key.split(".")
            parent: nn.Module = self
            for part in path[:-1]:
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            if leaf == "weight" and tensor.dim() == 2 and not hasattr(parent, path[-1]):
                linear = nn.Linear(tensor.shape[1], tensor.shape[0], bias=False)
                linear.weight.data.copy_(tensor)
                parent.add_module(path[-1], linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_per_expert_target_modules_adapter(tmp_path):
    factory = functools.partial(build, MOES, "qwen3_moe", torch.float32)
    factory().save_pretrained(tmp_path / "base")
    stored = load_merged(tmp_path / "base")
    layout = functools.partial(StoredLayout, stored)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=r".*experts\.\d+\.(gate|up|down)_proj")
    make_adapter(layout, config, tmp_path / "adapter")
    merge(local_source(tmp_path / "base"), [AdapterSpec(local_source(tmp_path / "adapter"))], tmp_path / "out")
    ours = load_merged(tmp_path / "out")
    ref = PeftModel.from_pretrained(layout(), tmp_path / "adapter").merge_and_unload().state_dict()
    changed = {k for k in ours if not torch.equal(ours[k], stored[k])}
    assert len(changed) == 2 * 4 * 3
    for key in changed:
        assert torch.equal(ours[key], ref[key]), key


def test_an_architecture_without_known_rules_is_refused_by_name(tmp_path):
    config = LoraConfig(r=2, lora_alpha=4, target_parameters=EXPERTS)
    prepare(tmp_path, "qwen3_moe", torch.float32, config)
    path = tmp_path / "base" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "architectures": ["MysteryMoeForCausalLM"]}))
    with pytest.raises(AdapterMismatchError) as caught:
        merge(local_source(tmp_path / "base"), [AdapterSpec(local_source(tmp_path / "adapter"))], tmp_path / "out")
    assert "MysteryMoeForCausalLM" in str(caught.value)


def test_inspect_shows_each_experts_rank_and_delta_norm(tmp_path):
    from lora_cli.adapters.loading import load_adapter
    from lora_cli.inspect import inspect_adapter
    from lora_cli.io.checkpoint import open_checkpoint

    config = LoraConfig(r=2, lora_alpha=4, target_parameters=EXPERTS)
    factory = prepare(tmp_path, "qwen3_moe", torch.float32, config)
    adapter = load_adapter(tmp_path / "adapter")
    with_base = inspect_adapter(adapter, open_checkpoint(tmp_path / "base"))
    rows = {m.name: m for m in with_base.modules}
    assert len(rows) == 2 * 4 * 3  # one row per stored expert tensor
    peft = PeftModel.from_pretrained(factory(), tmp_path / "adapter")
    expected = peft.base_model.model.model.layers[1].mlp.experts.get_delta_weight("default")  # down_proj [E, H, I]
    row = rows["model.layers.1.mlp.experts.3.down_proj.weight"]
    assert row.rank == 2 and row.scale == 2.0
    assert row.delta_norm == pytest.approx(float(expected[3].double().norm()), rel=1e-5)
    alone = inspect_adapter(adapter)
    assert sum(" expert " in m.name for m in alone.modules) == 2 * 2 * 4  # two stacks of four experts per layer
    assert {m.rank for m in alone.modules} == {2}


def test_diff_groups_expert_tensors_by_layer_and_expert(tmp_path):
    from lora_cli.diff import DiffOptions, diff

    config = LoraConfig(r=2, lora_alpha=4, target_parameters=["mlp.experts.gate_up_proj"])
    prepare(tmp_path, "qwen3_moe", torch.float32, config)
    _zero_rows_of_b(tmp_path / "adapter", "experts.lora_B.weight", slice(8, 16))  # gate only
    merge(local_source(tmp_path / "base"), [AdapterSpec(local_source(tmp_path / "adapter"))], tmp_path / "out")
    result = diff(local_source(tmp_path / "base"), local_source(tmp_path / "out"), DiffOptions())
    assert [(e.layer, e.expert) for e in result.experts] == [(i, e) for i in range(2) for e in range(4)]
    assert all(e.tensors == 3 and e.differ == 1 and e.components_differ == ["MLP gate"] for e in result.experts)
    routers = [t for t in result.tensors if t.component == "MLP router"]
    assert len(routers) == 2 and not any(t.differs for t in routers)


def test_moe_unmerge_and_memory(tmp_path):
    from lora_cli.unmerge import unmerge

    prepare(tmp_path, "mixtral", torch.float32, LoraConfig(r=2, lora_alpha=4, **CONFIGS["mixtral"]))
    adapter = [AdapterSpec(local_source(tmp_path / "adapter"))]
    merge(local_source(tmp_path / "base"), adapter, tmp_path / "merged")
    unmerge(local_source(tmp_path / "merged"), adapter, tmp_path / "out")
    base, merged, restored = (load_merged(tmp_path / d) for d in ("base", "merged", "out"))
    for key, original in base.items():
        # (W + d) - d in fp32: within 1 ulp of W at max(|W|, |W + d|)
        assert max_ulps(restored[key], original, at=torch.maximum(original.abs(), merged[key].abs())) <= 1.0, key
    from typer.testing import CliRunner

    from lora_cli.cli.app import app

    runner = CliRunner()
    result = runner.invoke(app, ["memory", str(tmp_path / "base"), str(tmp_path / "adapter"), "--json"])
    assert result.exit_code == 0, result.output
    base_dir, merged_dir, adapter_dir = (str(tmp_path / d) for d in ("base", "merged", "adapter"))
    checked = runner.invoke(app, ["diff", base_dir, merged_dir, "--adapter", adapter_dir, "--json"])
    assert checked.exit_code == 0, checked.output
    assert json.loads(checked.output)["adapter_check"]["verdict"] == "exact"
    shown = runner.invoke(app, ["diff", base_dir, merged_dir])
    assert "experts by layer" in shown.output and "0-3" in shown.output


def test_a_config_transformers_cannot_build_is_a_user_error(tmp_path):
    from typer.testing import CliRunner

    from lora_cli.cli.app import app

    prepare(tmp_path, "qwen3_moe", torch.float32, LoraConfig(r=2, lora_alpha=4, target_parameters=EXPERTS))
    path = tmp_path / "base" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "num_experts": "four"}))
    result = CliRunner().invoke(app, ["merge", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert "cannot build Qwen3MoeForCausalLM" in result.output
