"""`loractl inspect`: counts against the files, delta norms against the full matrices, PEFT's trainable line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, PeftModel
from safetensors import safe_open
from typer.testing import CliRunner

from lora_cli.adapters.base import EditContext, EditForm, TensorEdit
from lora_cli.adapters.loading import load_adapter
from lora_cli.adapters.registry import kind_for
from lora_cli.cli.app import app
from lora_cli.inspect import (
    _stats_without_base,
    dense_spectrum,
    factored_spectrum,
    inspect_ref,
)
from lora_cli.merge import merge
from lora_cli.sources import AdapterSpec, local_source
from tests.builders import make_adapter, peft_merged_state, save_base, tiny_llama

runner = CliRunner()
# Norms are computed in fp64 from the factors, the references in fp32 from the full product: 1e-5 relative covers
# fp32 rounding of a sum over a few thousand terms.
RTOL = 1e-5

CONFIGS = {
    "lora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "rslora_patterns": LoraConfig(
        r=8,
        lora_alpha=16,
        use_rslora=True,
        target_modules=["q_proj", "k_proj", "o_proj"],
        rank_pattern={"k_proj": 2},
        alpha_pattern={"o_proj": 5},
    ),
    "dora": LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "up_proj"]),
    "embedding": LoraConfig(r=4, lora_alpha=4, target_modules=["embed_tokens", "q_proj"]),
    "modules_to_save": LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj"], modules_to_save=["lm_head"]),
    "trainable_tokens": LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], trainable_token_indices=[1, 5, 7]),
    "loha": LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "up_proj"]),
    "lokr": LoKrConfig(r=4, alpha=8, target_modules=["v_proj"]),
    "ia3": IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_base(tiny_llama(), tmp_path_factory.mktemp("base") / "base")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, PeftModel]]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: (root / name, make_adapter(tiny_llama, config, root / name)) for name, config in CONFIGS.items()}


def file_numel(adapter_dir: Path) -> int:
    with safe_open(adapter_dir / "adapter_model.safetensors", "pt") as handle:
        return sum(math.prod(handle.get_slice(k).get_shape()) for k in handle.keys())  # noqa: SIM118


def full_lora_deltas(model: PeftModel) -> dict[str, torch.Tensor]:
    """PEFT's own `get_delta_weight` per LoRA layer, keyed by the base tensor name."""
    deltas = {}
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "r", {}):
            deltas[f"{name}.weight"] = module.get_delta_weight("default").detach().float()
    return deltas


@pytest.mark.parametrize("name", list(CONFIGS))
def test_counts_match_the_safetensors_file_and_peft(name: str, adapters: dict, base: Path) -> None:
    path, model = adapters[name]
    report = inspect_ref(str(path), base=str(base))
    assert report.num_params == file_numel(path) == report.params.total
    trainable, total = model.get_nb_trainable_parameters()
    assert (report.fit.trainable_params, report.fit.all_params) == (trainable, total)
    assert report.fit.peft_line == (
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    )


def test_other_types_without_base(adapters: dict) -> None:
    loha = inspect_ref(str(adapters["loha"][0]))
    assert loha.type_label == "LoHa" and {m.kind for m in loha.modules} == {"loha"}
    assert all(m.delta_norm > 0 and m.rank == 4 and m.scale == 2.0 for m in loha.modules)
    ia3 = inspect_ref(str(adapters["ia3"][0]))
    # IA3 scales the base: its change cannot be known without it.
    assert all(m.delta_norm is None and "--base" in m.note for m in ia3.modules)


def test_split_by_kind(adapters: dict) -> None:
    dora = inspect_ref(str(adapters["dora"][0]))
    assert dora.type_label == "DoRA" and dora.params.magnitudes == 2 * (64 + 32)  # q (64 out) and up (64 out)
    saved = inspect_ref(str(adapters["modules_to_save"][0]))
    assert saved.params.full_modules == 96 * 32  # lm_head
    tokens = inspect_ref(str(adapters["trainable_tokens"][0]))
    assert tokens.params.token_rows == 3 * 32
    assert inspect_ref(str(adapters["rslora_patterns"][0])).type_label == "LoRA (rsLoRA)"


@pytest.mark.parametrize("name", ["lora", "rslora_patterns", "embedding"])
def test_delta_norms_and_effective_rank_match_the_full_delta(name: str, adapters: dict) -> None:
    path, model = adapters[name]
    deltas = full_lora_deltas(model)
    report = inspect_ref(str(path))
    lora_rows = [m for m in report.modules if m.kind == "lora"]
    assert {m.name for m in lora_rows} == set(deltas)
    for module in lora_rows:
        delta = deltas[module.name]
        values = torch.linalg.svdvals(delta.double())
        p = values / values.sum()
        assert list(delta.shape) == module.shape
        assert module.delta_norm == pytest.approx(float(torch.linalg.matrix_norm(delta)), rel=RTOL)
        assert module.effective_rank == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-4)


def test_rank_alpha_and_scale_follow_the_patterns(adapters: dict) -> None:
    path, model = adapters["rslora_patterns"]
    layers = {f"{n}.weight": m for n, m in model.base_model.model.named_modules() if hasattr(m, "scaling")}
    for module in inspect_ref(str(path)).modules:
        layer = layers[module.name]
        assert module.rank == layer.r["default"]
        assert module.alpha == layer.lora_alpha["default"]
        assert module.scale == pytest.approx(layer.scaling["default"])


@pytest.mark.parametrize("name", ["lora", "dora", "modules_to_save", "loha", "lokr", "ia3"])
def test_with_base_the_norms_are_those_of_peft_merged_minus_base(name: str, adapters: dict, base: Path) -> None:
    path, _ = adapters[name]
    merged = peft_merged_state(tiny_llama, path)
    original = tiny_llama().state_dict()
    report = inspect_ref(str(path), base=str(base))
    for module in report.modules:
        delta = merged[module.name].double() - original[module.name].double()
        weight = original[module.name].double()
        # PEFT merges into fp32 weights in place; 1e-4 relative allows its fp32 rounding of W + delta.
        assert module.delta_norm == pytest.approx(float(delta.norm()), rel=1e-4)
        assert module.relative_norm == pytest.approx(float(delta.norm() / weight.norm()), rel=1e-4)
        if module.kind in ("lora", "dora", "loha", "lokr"):
            u, s, vh = torch.linalg.svd(delta)
            r = module.rank if module.kind == "lora" else int((s > s[0] * max(delta.shape) * 1.2e-7).sum())
            expected = float(s.norm() / (u[:, :r].T @ weight @ vh[:r].T).norm())
            # Top-r singular vectors (r: LoRA's rank, else the delta's numerical rank) are exact up to sign;
            # 1e-3 covers PEFT's fp32 rounding.
            assert module.amplification == pytest.approx(expected, rel=1e-3)


def test_factored_spectrum_matches_dense() -> None:
    generator = torch.Generator().manual_seed(3)
    left, right = torch.randn(300, 6, generator=generator), torch.randn(6, 200, generator=generator)
    factored = factored_spectrum(left, right, 0.5)
    dense = dense_spectrum(0.5 * left @ right, vectors=False)
    assert factored.norm == pytest.approx(dense.norm, rel=RTOL)
    # The dense spectrum has ~1e-6 noise where the factored one has exact zeros: 1e-3 on the entropy covers it.
    assert factored.effective_rank == pytest.approx(dense.effective_rank, rel=1e-3)
    assert dense.numerical_rank() == 6


class _Opaque(TensorEdit):
    """Hides a LoRA edit's factors: an additive edit that names no factors (its dense delta and spectrum) must agree
    with the factored path."""

    kind = "opaque"

    def __init__(self, inner: TensorEdit) -> None:
        super().__init__(inner.adapter, inner.target)
        self.inner = inner

    @property
    def form(self) -> EditForm:
        return EditForm("additive", shape=self.inner.form.shape)

    def delta(self, shape: tuple[int, ...], ctx: EditContext) -> torch.Tensor:
        return self.inner.delta(shape, ctx)

    def apply(self, weight: torch.Tensor, ctx: EditContext) -> torch.Tensor:
        return self.inner.apply(weight, ctx)


class _Scaling(_Opaque):
    """A multiplicative edit (like IA3): no delta of its own, so no norm without the base."""

    @property
    def form(self) -> EditForm:
        return EditForm("transform", shape=self.inner.form.shape)

    def apply(self, weight: torch.Tensor, ctx: EditContext) -> torch.Tensor:
        return weight * 1.5


def test_generic_additive_edits_use_their_dense_delta(adapters: dict) -> None:
    adapter = load_adapter(adapters["lora"][0])
    edits = kind_for(adapter).edits(adapter, lambda name: None)
    for edit in edits:
        factored = _stats_without_base(edit)
        generic = _stats_without_base(_Opaque(edit))
        assert generic.delta_norm == pytest.approx(factored.delta_norm, rel=1e-4)
        assert generic.effective_rank == pytest.approx(factored.effective_rank, rel=1e-3)
        assert generic.rank == factored.rank  # the numerical rank of the dense delta is the LoRA rank
        refused = _stats_without_base(_Scaling(edit))
        assert refused.delta_norm is None and "--base" in refused.note


def test_mismatched_base_fails_clearly(adapters: dict, tmp_path: Path) -> None:
    other = save_base(tiny_llama(hidden_size=48, num_attention_heads=4), tmp_path / "other")
    result = runner.invoke(app, ["inspect", str(adapters["lora"][0]), "--base", str(other)])
    assert result.exit_code == 2
    assert "do not fit" in result.stderr and "q_proj.weight" in result.stderr


def test_json_schema(adapters: dict, base: Path) -> None:
    result = runner.invoke(app, ["inspect", str(adapters["modules_to_save"][0]), "--base", str(base), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["peft_type"] == "LORA" and data["kind"] == "adapter"
    assert data["num_params"] == file_numel(adapters["modules_to_save"][0])
    assert all({"name", "rank", "delta_norm", "shape", "kind"} <= set(m) for m in data["modules"])
    assert data["fit"]["fits"] is True and data["fit"]["trainable_params"] > 0


def test_human_output_names_the_type_and_peft_line(adapters: dict, base: Path) -> None:
    result = runner.invoke(app, ["inspect", str(adapters["dora"][0]), "--base", str(base)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "DoRA" in result.stdout and "trainable params:" in result.stdout


def test_checkpoint_and_loractl_provenance(adapters: dict, base: Path, tmp_path: Path) -> None:
    plain = inspect_ref(str(base))
    assert plain.kind == "checkpoint" and plain.provenance is None
    assert sum(c.tensors for c in plain.components) == plain.num_tensors
    assert plain.num_params == sum(p.numel() for p in tiny_llama().parameters())
    by_name = {c.name: c for c in plain.components}
    assert by_name["self-attention q"].tensors == 2 and by_name["MLP down"].tensors == 2  # two layers
    assert by_name["norms"].tensors == 5 and by_name["embeddings"].tensors == by_name["head"].tensors == 1
    merge(local_source(base), [AdapterSpec(local_source(adapters["lora"][0]))], tmp_path / "merged")
    merged = runner.invoke(app, ["inspect", str(tmp_path / "merged"), "--json"])
    data = json.loads(merged.stdout)
    assert data["kind"] == "checkpoint" and data["provenance"]["operation"] == "merge"
