"""`loractl merge` onto quantized bases: NF4 saved by bitsandbytes and FP8 written by the test, merged and compared
with PEFT on the dequantized base (tensors and logits), and the output loaded by plain transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lora_cli.cli.app import app
from tests.builders import load_merged, peft_logits, peft_merged_state
from tests.builders_quant import TARGETS, build_quant_bases, load_bnb, merge_warnings, with_weights

runner = CliRunner()
INPUTS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(7))


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_quant_bases(tmp_path_factory.mktemp("qbases"))


def _bit_identical(ours: dict, reference: dict, names: list[str]) -> int:
    return sum(torch.equal(ours[n], reference[n]) for n in names)


@pytest.mark.parametrize("fmt", ["nf4", "fp8"])
def test_merge_onto_a_quantized_base_is_peft_on_the_dequantized_base(bases: dict, tmp_path: Path, fmt: str) -> None:
    out = tmp_path / "merged"
    result = invoke("merge", bases[fmt], bases["lora"], out, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    merged = load_merged(out)
    plain_names = set(load_file(bases["bf16"] / "model.safetensors"))
    assert set(merged) == plain_names  # every auxiliary tensor consumed, every weight back under its name
    assert all(t.dtype == torch.bfloat16 for t in merged.values())

    # NF4: PEFT merges into the bf16 dequantized weights (fp32 delta added, rounded once, as its in-place add does).
    # FP8: PEFT on the fp32 dequantized weights, rounded once to bf16 (transformers' own FP8 path rounds first).
    work = torch.bfloat16 if fmt == "nf4" else torch.float32
    reference = peft_merged_state(with_weights(bases[f"{fmt}-deq"], work), bases["lora"])
    reference = {k: v.to(torch.bfloat16) for k, v in reference.items()}
    edited = [n for n in merged if any(t in n for t in TARGETS)]
    for name, value in merged.items():
        torch.testing.assert_close(value, reference[name])  # bf16 defaults: rtol 1.6e-2, atol 1e-5
    assert _bit_identical(merged, reference, edited) == len(edited) == 6
    untouched = [n for n in merged if n not in edited]
    assert _bit_identical(merged, reference, untouched) == len(untouched)

    # Logits of the merged model, loaded by plain transformers, against the PeftModel on the dequantized base.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        ours = model(INPUTS).logits
    unmerged = peft_logits(with_weights(bases[f"{fmt}-deq"], torch.float32), bases["lora"], INPUTS)
    # Only the merged weights' one rounding to bf16 separates them: 3 bf16 ulps at the logits' scale.
    torch.testing.assert_close(ours, unmerged, rtol=0, atol=3 * 2**-8 * unmerged.abs().max().item())


def test_merge_without_edits_dequantizes_every_weight(bases: dict, tmp_path: Path) -> None:
    """An untouched quantized weight is written dequantized too: the output needs no quantization library."""
    out = tmp_path / "out"
    result = invoke("merge", bases["nf4"], bases["lora"], out, "--device", "cpu", "--dtype", "float32")
    assert result.exit_code == 0, result.output
    merged = load_merged(out)
    deq = load_file(bases["nf4-deq"] / "model.safetensors")
    name = "model.layers.0.mlp.gate_proj.weight"  # not targeted
    assert torch.equal(merged[name], deq[name].float())
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"


def test_missing_auxiliary_tensor_is_exit_2_naming_it(bases: dict, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in bases["fp8"].iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    state = load_file(broken / "model.safetensors")
    del state["model.layers.1.self_attn.v_proj.weight_scale_inv"]
    save_file(state, broken / "model.safetensors")
    result = invoke("merge", broken, bases["lora"], tmp_path / "out", "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert "model.layers.1.self_attn.v_proj.weight_scale_inv" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_quantized_mismatch_is_warned_both_ways(bases: dict, tmp_path: Path) -> None:
    quantized_name, plain_name = "unsloth/tiny-llama-bnb-4bit", "meta-llama/Tiny-Llama"
    warnings = merge_warnings(bases["bf16"], bases["lora"], tmp_path / "a", quantized_name)
    assert any("a quantized model, but the base given is not quantized" in w for w in warnings), warnings
    warnings = merge_warnings(bases["nf4"], bases["lora"], tmp_path / "b", quantized_name)
    assert not any("quantized model" in w for w in warnings), warnings
    warnings = merge_warnings(bases["nf4"], bases["lora"], tmp_path / "c", plain_name)
    assert any("names no quantized model, but the base given is quantized (bitsandbytes)" in w for w in warnings)


def test_bitsandbytes_is_needed_only_to_requantize(
    bases: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    result = invoke("merge", bases["nf4"], bases["lora"], tmp_path / "plain", "--device", "cpu")
    assert result.exit_code == 0, result.output  # dequantized by bitsandbytes' formula, without the library
    result = invoke("merge", bases["nf4"], bases["lora"], tmp_path / "out", "--device", "cpu", "--requantize")
    assert result.exit_code == 2, result.output
    assert "needs the bitsandbytes package" in result.output and "pip install loractl[quant]" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_qlora_merge_reproduces_the_peft_model_on_the_4bit_base(bases: dict, tmp_path: Path) -> None:
    """What QLoRA users run is the PeftModel on the 4-bit base: merging into the dequantized base reproduces it,
    merging into the original bf16 weights does not (README "QLoRA semantics"; scripts/qlora_table.py)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        trained = PeftModel.from_pretrained(load_bnb(bases["nf4"]), bases["lora"]).eval()(INPUTS).logits.float()
    errors = {}
    for base in ("nf4", "bf16"):
        out = tmp_path / base
        assert invoke("merge", bases[base], bases["lora"], out, "--device", "cpu").exit_code == 0
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
        with torch.no_grad():
            errors[base] = (model(INPUTS).logits.float() - trained).abs().max().item()
    scale = trained.abs().max().item()
    # bf16 forward passes that differ only in where the delta is rounded: a few bf16 ulps of the largest logit.
    assert errors["nf4"] <= 4 * 2**-8 * scale, errors
    assert errors["bf16"] > 4 * errors["nf4"], errors


def test_inspect_diff_memory_and_unmerge_read_quantized_bases(
    bases: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every command opens a quantized base as its dequantized tensors (lora_cli/io/checkpoint.py)."""
    from lora_cli import memory

    # The reference process's import cost is measured in a subprocess (30 s here); not what this test is about.
    monkeypatch.setattr(memory, "reference_process_bytes", lambda: memory.REFERENCE_PROCESS_FALLBACK_BYTES)
    result = invoke("diff", bases["nf4"], bases["nf4-deq"], "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["differ"] is False  # NF4 read as PEFT's own dequantization, bit for bit
    for args in (("inspect", bases["lora"], "--base", bases["fp8"]), ("memory", bases["nf4"], bases["lora"])):
        result = invoke(*args, "--json")
        assert result.exit_code == 0, result.output
    merged = tmp_path / "merged"
    assert invoke("merge", bases["fp8"], bases["lora"], merged, "--device", "cpu", "--dtype", "float32").exit_code == 0
    result = invoke("unmerge", merged, bases["lora"], tmp_path / "back", "--check-against", bases["fp8"], "--json")
    assert result.exit_code == 0, result.output
    back, reference = load_merged(tmp_path / "back"), load_file(bases["fp8-deq"] / "model.safetensors")
    for name in back:
        torch.testing.assert_close(back[name], reference[name].to(back[name].dtype), rtol=2**-20, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["nf4", "fp8"])
def test_dequantizing_on_the_gpu_gives_the_cpu_bytes(bases: dict, tmp_path: Path, fmt: str) -> None:
    """FP8 and bitsandbytes 4-bit are dequantized on the device that merges (exact IEEE operations only)."""
    outputs = []
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        result = invoke("merge", bases[fmt], bases["lora"], out, "--device", device)
        assert result.exit_code == 0, result.output
        outputs.append((out / "model.safetensors").read_bytes())
    assert outputs[0] == outputs[1]
