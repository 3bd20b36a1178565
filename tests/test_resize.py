"""`loractl resize`: the best rank-k approximation of each module (against fp64 SVDs of the formed delta), PEFT
loading the result, LoHa/LoKr converted to LoRA, what is carried over, and what is refused.

Tolerances: factors are computed in fp64 and written in fp32, so B'A' is within a few fp32 ulps of the largest
singular value of the fp64 truncation (atol 8 * eps32 * s1). Logits through PEFT: fp32 compute of a 2-layer
model with a different but equal delta, atol 1e-4.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig, PeftModel
from safetensors.torch import load_file
from typer.testing import CliRunner

from lora_cli.cli.app import app
from lora_cli.lowrank import Truncation
from lora_cli.resize import ResizeOptions, resize
from tests.builders import logits_of, make_adapter, tiny_llama

runner = CliRunner()
INPUTS = torch.tensor([[3, 8, 1, 40, 17, 6, 90, 2]])
EPS32 = torch.finfo(torch.float32).eps


def factors_by_module(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    state = load_file(path / "adapter_model.safetensors")
    found = {}
    for key, a in state.items():
        if key.endswith("lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            found[module] = (a.double(), state[key.replace("lora_A", "lora_B")].double())
    return found


def peft_logits(adapter: Path) -> torch.Tensor:
    return logits_of(PeftModel.from_pretrained(tiny_llama(), adapter), INPUTS)


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("resize") / "lora"
    config = LoraConfig(r=6, lora_alpha=12, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    make_adapter(tiny_llama, config, path, scale=0.3)
    return path


def test_resize_gives_the_best_rank_k_approximation_of_each_delta(lora, tmp_path):
    summary = resize(lora, tmp_path / "r3", ResizeOptions(Truncation(rank=3)))
    assert {(m.old_rank, m.rank) for m in summary.modules} == {(6, 3)}
    old, new = factors_by_module(lora), factors_by_module(tmp_path / "r3")
    assert set(old) == set(new) and len(old) == 6
    for module, (a, b) in old.items():
        u, s, vh = torch.linalg.svd(2.0 * b @ a)  # scale = alpha / r = 2
        best = (u[:, :3] * s[:3]) @ vh[:3]
        new_a, new_b = new[module]
        torch.testing.assert_close(new_b @ new_a, best, rtol=0, atol=8 * EPS32 * float(s[0]))
        kept = next(m.energy_kept for m in summary.modules if m.module == module)
        assert kept == pytest.approx(float((s[:3] ** 2).sum() / (s**2).sum()), rel=1e-9)
    config = json.loads((tmp_path / "r3" / "adapter_config.json").read_text())
    assert (
        config["r"] == 3
        and config["lora_alpha"] == 3
        and sorted(config["target_modules"]) == ["q_proj", "up_proj", "v_proj"]
    )

    # PEFT applies it: the same logits as the base with each module's best rank-3 delta added.
    model = tiny_llama()
    with torch.no_grad():
        for module, (a, b) in old.items():
            u, s, vh = torch.linalg.svd(2.0 * b @ a)
            model.get_submodule(module).weight += ((u[:, :3] * s[:3]) @ vh[:3]).float()
    torch.testing.assert_close(peft_logits(tmp_path / "r3"), logits_of(model, INPUTS), atol=1e-4, rtol=0)


def test_resize_at_full_rank_changes_nothing_peft_can_see(lora, tmp_path):
    resize(lora, tmp_path / "same", ResizeOptions(Truncation(rank=6)))
    torch.testing.assert_close(peft_logits(tmp_path / "same"), peft_logits(lora), atol=1e-4, rtol=0)


def test_energy_sets_per_module_ranks_in_rank_pattern(lora, tmp_path):
    summary = resize(lora, tmp_path / "e", ResizeOptions(Truncation(energy=0.8, max_rank=5)))
    ranks = {m.module: m.rank for m in summary.modules}
    assert all(1 <= r <= 5 for r in ranks.values()) and all(
        m.energy_kept >= 0.8 or m.rank == 5 for m in summary.modules
    )
    config = json.loads((tmp_path / "e" / "adapter_config.json").read_text())
    assert {m: r for m, r in ranks.items() if r != config["r"]} == config["rank_pattern"]
    assert config["alpha_pattern"] == config["rank_pattern"]
    model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "e")
    for module, rank in ranks.items():
        layer = model.base_model.model.get_submodule(module)
        assert layer.r["default"] == rank and layer.scaling["default"] == 1.0


@pytest.mark.parametrize(
    "config",
    [
        LoHaConfig(r=2, alpha=4, target_modules=["q_proj", "down_proj"]),
        LoKrConfig(r=2, alpha=4, target_modules=["k_proj", "gate_proj"]),
    ],
    ids=["loha", "lokr"],
)
def test_loha_and_lokr_become_a_lora_with_the_same_logits(config, tmp_path):
    make_adapter(tiny_llama, config, tmp_path / "in", scale=0.3)
    summary = resize(tmp_path / "in", tmp_path / "lora", ResizeOptions(Truncation(energy=1 - 1e-9)))
    assert summary.source_type in ("LOHA", "LOKR") and all(m.old_rank is None for m in summary.modules)
    written = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA"
    torch.testing.assert_close(peft_logits(tmp_path / "lora"), peft_logits(tmp_path / "in"), atol=1e-4, rtol=0)


def test_biases_and_modules_to_save_are_carried_over(tmp_path):
    config = LoraConfig(
        r=4, target_modules=["q_proj", "o_proj"], lora_bias=True, modules_to_save=["lm_head"], init_lora_weights=False
    )
    make_adapter(tiny_llama, config, tmp_path / "in", scale=0.3)
    summary = resize(tmp_path / "in", tmp_path / "out", ResizeOptions(Truncation(rank=4)))
    assert "lm_head.weight" in summary.carried and sum(".lora_B.bias" in c for c in summary.carried) == 4
    torch.testing.assert_close(peft_logits(tmp_path / "out"), peft_logits(tmp_path / "in"), atol=1e-4, rtol=0)


def test_dora_and_bad_options_are_refused_in_one_line(lora, tmp_path):
    make_adapter(tiny_llama, LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), tmp_path / "dora")
    for args, needle in [
        ([tmp_path / "dora", tmp_path / "x", "--rank", "1"], "not by adding a delta"),
        ([lora, tmp_path / "x", "--rank", "1", "--energy", "0.5"], "exactly one of"),
        ([lora, tmp_path / "x", "--rank", "0"], "at least 1"),
    ]:
        result = runner.invoke(app, ["resize", *map(str, args)])
        assert result.exit_code == 2 and needle in result.output and "Traceback" not in result.output, result.output
        assert not (tmp_path / "x").exists()
