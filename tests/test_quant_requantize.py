"""`merge --requantize`: the base's own format written back; untouched quantized weights copied as stored, edited
ones quantized again by the format's reference quantizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lora_cli.quant import fp8
from tests.builders import load_merged
from tests.builders_quant import FP8_BLOCK, TARGETS, bnb_dequantized, build_quant_bases, load_bnb
from tests.test_quant_merge import invoke


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_quant_bases(tmp_path_factory.mktemp("qbases"))


def headers(path: Path) -> dict[str, tuple[str, list[int]]]:
    with safe_open(path / "model.safetensors", "pt") as f:
        return {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118


def test_fp8_quantizer_is_transformers_fp8quantize() -> None:
    from types import SimpleNamespace

    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    torch.manual_seed(0)
    weight = torch.randn(256, 384) * 0.02
    weight[:128, :128] = 0  # a zero block keeps scale 1, as transformers does
    config = SimpleNamespace(quantization_config=SimpleNamespace(weight_block_size=[128, 128], scale_fmt=None))
    expected = Fp8Quantize(config)._quantize_one("w.weight", weight)
    quantized, inverse = fp8.quantize_blocks(weight, (128, 128))
    assert torch.equal(quantized.view(torch.uint8), expected["w.weight"].view(torch.uint8))
    assert torch.equal(inverse, expected["w.weight_scale_inv"])


def test_fp8_requantize_round_trip(bases: dict, tmp_path: Path) -> None:
    out = tmp_path / "fp8"
    result = invoke("merge", bases["fp8"], bases["lora"], out, "--device", "cpu", "--requantize")
    assert result.exit_code == 0, result.output
    assert headers(out) == headers(bases["fp8"])  # same tensors, dtypes and shapes: the base's format
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    written, base = load_file(out / "model.safetensors"), load_file(bases["fp8"] / "model.safetensors")
    edited = {n for n in written if any(t in n for t in TARGETS)}
    for name in set(written) - edited:  # untouched: the stored bytes
        assert torch.equal(written[name].view(torch.uint8), base[name].view(torch.uint8)), name
    # Edited: the fp32 merge (W8 x scale + delta, unrounded) quantized again, amax / 448 per block.
    merged = load_merged(_plain_fp32(bases, tmp_path))
    for name in (n for n in edited if n.endswith("weight")):
        quantized, inverse = fp8.quantize_blocks(merged[name], tuple(FP8_BLOCK))
        assert torch.equal(written[name].view(torch.uint8), quantized.view(torch.uint8)), name
        assert torch.equal(written[name + "_scale_inv"], inverse)
        # Round trip: within E4M3's half-ulp (2^-4 relative) or half its smallest subnormal step of each block.
        back = fp8.dequantize(written[name], inverse, tuple(FP8_BLOCK))
        grid = fp8.dequantize(torch.ones_like(written[name], dtype=torch.float32), inverse, tuple(FP8_BLOCK))
        assert ((back - merged[name]).abs() <= torch.maximum(merged[name].abs() * 2**-4, grid * 2**-10)).all()


def _plain_fp32(bases: dict, tmp_path: Path) -> Path:
    out = tmp_path / "plain32"
    assert invoke("merge", bases["fp8"], bases["lora"], out, "--device", "cpu", "--dtype", "float32").exit_code == 0
    return out


def test_nf4_requantize_is_peft_linear4bit_merge(bases: dict, tmp_path: Path) -> None:
    from peft import PeftModel

    out = tmp_path / "nf4"
    result = invoke("merge", bases["nf4"], bases["lora"], out, "--device", "cpu", "--requantize")
    assert result.exit_code == 0, result.output
    ours, base = headers(out), headers(bases["nf4"])
    assert set(ours) == set(base)
    assert all(ours[n] == base[n] for n in base if "quant_state" not in n)  # the state's JSON is padded
    written, stored = load_file(out / "model.safetensors"), load_file(bases["nf4"] / "model.safetensors")
    for name in (n for n in written if not any(t in n for t in TARGETS)):
        assert torch.equal(written[name], stored[name]), name
    # PEFT's Linear4bit.merge: dequantize_4bit + fp32 delta, quantized again by Params4bit (quantize_4bit).
    reference = PeftModel.from_pretrained(load_bnb(bases["nf4"]), bases["lora"]).merge_and_unload()
    expected, loaded = bnb_dequantized(reference), bnb_dequantized(load_bnb(out))  # transformers + bnb load it
    assert set(expected) == set(loaded)
    for name, value in expected.items():
        assert torch.equal(loaded[name], value), name


def test_requantize_refuses_by_name(bases: dict, tmp_path: Path) -> None:
    result = invoke("merge", bases["bf16"], bases["lora"], tmp_path / "a", "--requantize")
    assert result.exit_code == 2 and "--requantize needs a quantized base" in result.output
    from tests.builders_quant import save_bnb

    int8 = save_bnb(bases["bf16"], tmp_path / "int8", "int8")
    result = invoke("merge", int8, bases["lora"], tmp_path / "b", "--requantize")
    assert result.exit_code == 2, result.output
    assert "--requantize of bitsandbytes int8 weights" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "b").exists()


@pytest.mark.parametrize("fmt", ["fp8", "nf4"])
def test_requantize_without_edits_copies_the_base(bases: dict, tmp_path: Path, fmt: str) -> None:
    """A weight the adapter does not touch keeps its stored bytes, scale and state included."""
    out = tmp_path / fmt
    assert invoke("merge", bases[fmt], bases["lora"], out, "--device", "cpu", "--requantize").exit_code == 0
    written, stored = load_file(out / "model.safetensors"), load_file(bases[fmt] / "model.safetensors")
    untouched = [n for n in stored if "gate_proj" in n]
    assert untouched and all(torch.equal(written[n], stored[n]) for n in untouched)


def test_unmerge_of_a_requantized_merge_is_written_dequantized(bases: dict, tmp_path: Path) -> None:
    merged = tmp_path / "merged"
    assert invoke("merge", bases["fp8"], bases["lora"], merged, "--device", "cpu", "--requantize").exit_code == 0
    back = tmp_path / "back"
    result = invoke("unmerge", merged, bases["lora"], back, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "quantization_config" not in json.loads((back / "config.json").read_text())
    restored, reference = load_merged(back), load_file(bases["fp8-deq"] / "model.safetensors")
    assert set(restored) == set(reference)
    merged32 = load_merged(_plain_fp32(bases, tmp_path))
    for name in (n for n in restored if any(t in n for t in TARGETS) and n.endswith("weight")):
        # The requantized merge carries E4M3's rounding of W + delta (half an ulp: 2^-4 of |W + delta|, or of the
        # block's subnormal step), and the unmerged weight keeps it, plus its own bf16 rounding.
        error = (restored[name].float() - reference[name]).abs()
        bound = merged32[name].abs() * 2**-4 + reference[name].abs() * 2**-8 + 1e-6
        assert (error <= bound).all(), name


def test_requantize_of_a_broken_adapter_fails_cleanly(bases: dict, tmp_path: Path) -> None:
    """NaN in an edited weight: exit 2 naming the adapter, no output, and no companion read left waiting."""
    from tests.test_cli_merge import copy_folder

    lora = copy_folder(bases["lora"], tmp_path / "lora")
    state = load_file(lora / "adapter_model.safetensors")
    key = next(k for k in state if "lora_B" in k and "q_proj" in k)
    state[key][0, 0] = float("nan")
    from safetensors.torch import save_file

    save_file(state, lora / "adapter_model.safetensors")
    for fmt in ("fp8", "nf4"):
        result = invoke("merge", bases[fmt], lora, tmp_path / fmt, "--device", "cpu", "--requantize")
        assert result.exit_code == 2, result.output
        assert "holds NaN or Inf" in result.output and not (tmp_path / fmt).exists()
