"""loractl unmerge on tiny models built here: merge then unmerge gives the base back, refusals, re-tying, JSON.

Tolerances: the merge rounded W + delta once to the stored dtype, and unmerge rounds (merged - delta) once more,
so each element is within 1 ulp counted at the larger magnitude of W and the merged value (half an ulp from each
rounding); that holds for bf16 and for fp32 alike, and against PEFT's merge_and_unload, which rounds the same way.
Tensors no adapter touches are copied as bytes and must be bit-identical.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file
from typer.testing import CliRunner

from lora_cli.cli.app import app
from lora_cli.engine import WriteOptions
from lora_cli.errors import NotRevertibleError
from lora_cli.merge import merge
from lora_cli.numerics import max_ulps
from lora_cli.sources import AdapterSpec, local_source
from lora_cli.unmerge import unmerge
from tests.builders import make_adapter, save_base, tiny_llama

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def state(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def specs(*paths: Path) -> list[AdapterSpec]:
    return [AdapterSpec(local_source(p)) for p in paths]


def do_merge(base: Path, adapters: list[Path], out: Path, **options) -> Path:
    merge(local_source(base), specs(*adapters), out, WriteOptions(device="cpu", **options))
    return out


def do_unmerge(merged: Path, adapters: list[Path], out: Path, *, base=None, check=None, **options):
    return unmerge(
        local_source(merged),
        specs(*adapters),
        out,
        WriteOptions(device="cpu", **options),
        base=local_source(base) if base else None,
        check_against=local_source(check) if check else None,
    )


def assert_round_trip(base: dict, merged: dict, restored: dict, budget: float = 1.0) -> None:
    """Edited tensors within `budget` ulps at max(|W|, |merged|); untouched ones bit-identical."""
    assert set(restored) == set(base)
    for name, original in base.items():
        if torch.equal(merged[name], original):
            assert torch.equal(restored[name], original), name
        else:
            assert max_ulps(restored[name], original, at=merged[name]) <= budget, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_merge_then_unmerge_gives_the_base_back(tmp_path, dtype):
    factory = functools.partial(tiny_llama, dtype)
    save_base(factory(), tmp_path / "base")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=LINEARS, init_lora_weights=False)
    make_adapter(factory, config, tmp_path / "adapter")
    do_merge(tmp_path / "base", [tmp_path / "adapter"], tmp_path / "merged")
    summary = do_unmerge(tmp_path / "merged", [tmp_path / "adapter"], tmp_path / "out", check=tmp_path / "base")
    assert summary.operation == "unmerge" and summary.tensors_edited == 14
    assert_round_trip(state(tmp_path / "base"), state(tmp_path / "merged"), state(tmp_path / "out"))
    assert summary.check_max_ulps <= 1.0 and len(summary.checks) == 14
    assert 0.0 < summary.check_exact_share <= 1.0
    expected = "about 1 ulp of bfloat16" if dtype == torch.bfloat16 else "within float32 rounding"
    assert expected in summary.expected_error
    record = json.loads((tmp_path / "out" / "loractl.json").read_text())
    assert record["operation"] == "unmerge" and record["merged"]["ref"] == str(tmp_path / "merged")


def test_unmerge_of_a_peft_made_merge(tmp_path):
    factory = functools.partial(tiny_llama, torch.bfloat16)
    save_base(factory(), tmp_path / "base")
    config = LoraConfig(r=8, lora_alpha=16, target_modules=LINEARS, init_lora_weights=False)
    make_adapter(factory, config, tmp_path / "adapter", scale=0.1)
    PeftModel.from_pretrained(factory(), tmp_path / "adapter").merge_and_unload().save_pretrained(tmp_path / "merged")
    summary = do_unmerge(tmp_path / "merged", [tmp_path / "adapter"], tmp_path / "out", check=tmp_path / "base")
    assert_round_trip(state(tmp_path / "base"), state(tmp_path / "merged"), state(tmp_path / "out"))
    assert summary.check_max_ulps <= 1.0


def test_stacked_adapters_are_undone_in_reverse(tmp_path):
    factory = functools.partial(tiny_llama, torch.bfloat16)
    save_base(factory(), tmp_path / "base")
    make_adapter(factory, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), tmp_path / "a", seed=1, scale=0.2)
    make_adapter(factory, LoraConfig(r=2, target_modules=["v_proj", "up_proj"]), tmp_path / "b", seed=2, scale=0.2)
    do_merge(tmp_path / "base", [tmp_path / "a", tmp_path / "b"], tmp_path / "merged")
    summary = do_unmerge(tmp_path / "merged", [tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    assert summary.tensors_edited == 6
    assert_round_trip(state(tmp_path / "base"), state(tmp_path / "merged"), state(tmp_path / "out"))


def test_merge_dtype_is_kept_unless_asked(tmp_path):
    factory = functools.partial(tiny_llama, torch.bfloat16)
    save_base(factory(), tmp_path / "base")
    make_adapter(factory, LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "adapter", scale=0.2)
    do_merge(tmp_path / "base", [tmp_path / "adapter"], tmp_path / "merged", dtype="float32")
    do_unmerge(tmp_path / "merged", [tmp_path / "adapter"], tmp_path / "kept")
    assert {t.dtype for t in state(tmp_path / "kept").values()} == {torch.float32}
    do_unmerge(tmp_path / "merged", [tmp_path / "adapter"], tmp_path / "bf16", dtype="bfloat16")
    restored, base = state(tmp_path / "bf16"), state(tmp_path / "base")
    assert {t.dtype for t in restored.values()} == {torch.bfloat16}
    # The fp32 merge kept W + delta exactly enough that one rounding back to bf16 lands on W, within 1 ulp.
    for name, original in base.items():
        assert max_ulps(restored[name], original) <= 1.0, name
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_modules_to_save_is_refused_without_base_and_restored_with_it(tmp_path):
    factory = functools.partial(tiny_llama, torch.float32)
    save_base(factory(), tmp_path / "base")
    config = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False)
    make_adapter(factory, config, tmp_path / "adapter")
    do_merge(tmp_path / "base", [tmp_path / "adapter"], tmp_path / "merged")
    with pytest.raises(NotRevertibleError, match="modules_to_save"):
        do_unmerge(tmp_path / "merged", [tmp_path / "adapter"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    summary = do_unmerge(tmp_path / "merged", [tmp_path / "adapter"], tmp_path / "out", base=tmp_path / "base")
    assert summary.base_used_for == ["lm_head.weight"]
    base, restored = state(tmp_path / "base"), state(tmp_path / "out")
    assert torch.equal(restored["lm_head.weight"], base["lm_head.weight"])
    assert_round_trip(base, state(tmp_path / "merged"), restored)


def test_dora_is_refused_without_base_and_reverted_with_it(tmp_path):
    factory = functools.partial(tiny_llama, torch.float32)
    save_base(factory(), tmp_path / "base")
    config = LoraConfig(r=4, use_dora=True, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    make_adapter(factory, config, tmp_path / "adapter", scale=0.1)
    do_merge(tmp_path / "base", [tmp_path / "adapter"], tmp_path / "merged")
    result = CliRunner().invoke(
        app, ["unmerge", str(tmp_path / "merged"), str(tmp_path / "adapter"), str(tmp_path / "out")]
    )
    assert result.exit_code == 2 and "DoRA" in result.output and "--base" in result.output
    summary = do_unmerge(tmp_path / "merged", [tmp_path / "adapter"], tmp_path / "out", base=tmp_path / "base")
    assert len(summary.base_used_for) == 2 * 2
    base, restored = state(tmp_path / "base"), state(tmp_path / "out")
    for name in summary.base_used_for:
        # merged / (m / ||W + delta||) - delta in fp32: a few fp32 roundings of values of |W + delta|.
        torch.testing.assert_close(restored[name], base[name], rtol=0, atol=1e-5)


def test_untied_head_is_tied_again(tmp_path):
    factory = functools.partial(tiny_llama, torch.bfloat16, tie_word_embeddings=True)
    save_base(factory(), tmp_path / "base")
    config = LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False)
    make_adapter(factory, config, tmp_path / "adapter", scale=0.2)
    do_merge(tmp_path / "base", [tmp_path / "adapter"], tmp_path / "merged")
    assert "lm_head.weight" in state(tmp_path / "merged")
    summary = do_unmerge(tmp_path / "merged", [tmp_path / "adapter"], tmp_path / "out")
    assert summary.retied == ["lm_head.weight"]
    restored, base = state(tmp_path / "out"), state(tmp_path / "base")
    assert "lm_head.weight" not in restored
    # The untouched head held the base embedding's exact bytes; the embedding is taken from it.
    assert torch.equal(restored["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is True
    assert json.loads((tmp_path / "out" / "loractl.json").read_text())["config_changes"]["tie_word_embeddings"]


def test_head_lora_reverted_is_tied_again_and_a_partial_unmerge_stays_untied(tmp_path):
    factory = functools.partial(tiny_llama, torch.bfloat16, tie_word_embeddings=True)
    save_base(factory(), tmp_path / "base")
    make_adapter(factory, LoraConfig(r=4, target_modules=["lm_head"]), tmp_path / "head", scale=0.2)
    make_adapter(factory, LoraConfig(r=4, target_modules=["embed_tokens"]), tmp_path / "emb", seed=3, scale=0.2)
    base = state(tmp_path / "base")
    do_merge(tmp_path / "base", [tmp_path / "head"], tmp_path / "merged")
    summary = do_unmerge(tmp_path / "merged", [tmp_path / "head"], tmp_path / "out")
    # The head came back within 1 ulp of W and the untouched embedding is W itself: tied again, bit-exact.
    assert summary.retied == ["lm_head.weight"]
    restored = state(tmp_path / "out")
    assert set(restored) == set(base)
    assert torch.equal(restored["model.embed_tokens.weight"], base["model.embed_tokens.weight"])

    do_merge(tmp_path / "base", [tmp_path / "emb", tmp_path / "head"], tmp_path / "both")
    partial = do_unmerge(tmp_path / "both", [tmp_path / "head"], tmp_path / "partial")
    # The embedding still carries the other adapter, so the two cannot be tied: both kept, and said so.
    assert partial.retied == [] and any("still differ" in w for w in partial.warnings)
    kept = state(tmp_path / "partial")
    assert (
        max_ulps(
            kept["lm_head.weight"], base["model.embed_tokens.weight"], at=state(tmp_path / "both")["lm_head.weight"]
        )
        <= 1.0
    )
    assert json.loads((tmp_path / "partial" / "config.json").read_text())["tie_word_embeddings"] is False


def test_cli_json_and_inputs_untouched(tmp_path):
    factory = functools.partial(tiny_llama, torch.bfloat16)
    save_base(factory(), tmp_path / "base")
    make_adapter(factory, LoraConfig(r=4, target_modules=["v_proj"]), tmp_path / "adapter", scale=0.2)
    do_merge(tmp_path / "base", [tmp_path / "adapter"], tmp_path / "merged")
    before = {p.name: p.read_bytes() for p in (tmp_path / "merged").iterdir()}
    args = ["unmerge", str(tmp_path / "merged"), str(tmp_path / "adapter"), str(tmp_path / "out")]
    result = CliRunner().invoke(app, [*args, "--check-against", str(tmp_path / "base"), "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["operation"] == "unmerge" and data["tensors_edited"] == 2
    assert data["check_max_ulps"] <= 1.0 and 0 < data["check_exact_share"] <= 1
    assert {c["name"] for c in data["checks"]} == {f"model.layers.{i}.self_attn.v_proj.weight" for i in range(2)}
    assert {"max_ulps", "exact_share", "max_abs", "dtype"} <= set(data["checks"][0])
    assert "ulp" in data["expected_error"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "merged").iterdir()} == before
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "already exists" in again.output
    diff = CliRunner().invoke(app, ["diff", str(tmp_path / "base"), str(tmp_path / "out"), "--atol", "0.02"])
    assert diff.exit_code == 0, diff.output  # within a bf16 ulp of values below 1


def test_peft_merge_of_a_tied_embedding_stays_tied(tmp_path):
    factory = functools.partial(tiny_llama, torch.bfloat16, tie_word_embeddings=True)
    save_base(factory(), tmp_path / "base")
    config = LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False)
    make_adapter(factory, config, tmp_path / "adapter", scale=0.2)
    # PEFT merges the embedding's delta into the one shared tensor and saves it tied, without a head.
    PeftModel.from_pretrained(factory(), tmp_path / "adapter").merge_and_unload().save_pretrained(tmp_path / "merged")
    merged = state(tmp_path / "merged")
    assert "lm_head.weight" not in merged
    summary = do_unmerge(tmp_path / "merged", [tmp_path / "adapter"], tmp_path / "out")
    assert "tie_word_embeddings" not in summary.config_changes and not summary.warnings
    # PEFT rounds an embedding's delta to bf16 before adding it (a second rounding, half an ulp more): 1.5 ulps.
    assert_round_trip(state(tmp_path / "base"), merged, state(tmp_path / "out"), budget=1.5)


def test_trainable_tokens_are_refused_without_base_and_restored_with_it(tmp_path):
    factory = functools.partial(tiny_llama, torch.float32, tie_word_embeddings=True)
    save_base(factory(), tmp_path / "base")
    config = LoraConfig(r=4, target_modules=["v_proj"], trainable_token_indices=[1, 5, 7], init_lora_weights=False)
    make_adapter(factory, config, tmp_path / "adapter")
    do_merge(tmp_path / "base", [tmp_path / "adapter"], tmp_path / "merged")
    with pytest.raises(NotRevertibleError, match="trainable tokens"):
        do_unmerge(tmp_path / "merged", [tmp_path / "adapter"], tmp_path / "out")
    summary = do_unmerge(tmp_path / "merged", [tmp_path / "adapter"], tmp_path / "out", base=tmp_path / "base")
    assert summary.base_used_for == ["model.embed_tokens.weight"]
    base, restored = state(tmp_path / "base"), state(tmp_path / "out")
    # The replaced rows come from the base, the others were never touched: the embedding is the base's, exactly.
    assert torch.equal(restored["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert_round_trip(base, state(tmp_path / "merged"), restored)
