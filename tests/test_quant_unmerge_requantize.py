"""`unmerge --requantize`: a quantized merged checkpoint (the output of `merge --requantize`) written back in its own
format. Reverted weights are dequant(merged) - delta in fp32, quantized again by the format's reference quantizer
(transformers' `Fp8Quantize`, bitsandbytes' `quantize_4bit` as PEFT's `Linear4bit.unmerge` calls it); every other
tensor is copied as stored."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from lora_cli.quant.requantize import STATE_ROOM
from tests.builders_quant import (
    FP8_BLOCK,
    TARGETS,
    bnb_dequantized,
    build_quant_bases,
    load_bnb,
    save_bnb,
    write_checkpoint,
    write_format_base,
)
from tests.test_quant_merge import invoke


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qunmerge")
    found = build_quant_bases(root)
    found["fp8-channel"] = _fp8_per_channel(found["bf16"], root / "fp8-channel")
    return found


def _fp8_per_channel(template: Path, out: Path) -> Path:
    """fbgemm_fp8's layout: E4M3 weights, one fp32 `weight_scale` per row ([out, 1]), amax / 448."""
    stored = {}
    for name, value in load_file(template / "model.safetensors").items():
        if name.endswith("proj.weight"):
            scale = value.float().abs().amax(dim=1, keepdim=True) / 448.0
            stored[name] = (value.float() / scale).to(torch.float8_e4m3fn)
            stored[name.removesuffix("weight") + "weight_scale"] = scale
        else:
            stored[name] = value
    config = json.loads((template / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fbgemm_fp8"}
    return write_checkpoint(out, [stored], config)


def _round_trip(bases: dict, fmt: str, tmp_path: Path) -> tuple[Path, Path]:
    merged, back = tmp_path / "merged", tmp_path / "back"
    result = invoke("merge", bases[fmt], bases["lora"], merged, "--device", "cpu", "--requantize")
    assert result.exit_code == 0, result.output
    result = invoke("unmerge", merged, bases["lora"], back, "--device", "cpu", "--requantize", "--json")
    assert result.exit_code == 0, result.output
    return merged, back


def _edited(name: str) -> bool:
    return any(t in name for t in TARGETS)


def _peft_unmerge(model: torch.nn.Module, adapter: Path) -> torch.nn.Module:
    """PEFT's own unmerge: the adapter loaded onto the merged model, marked as merged, then `unmerge_adapter()`
    (`Linear.unmerge`: W -= delta in the weight's dtype; `Linear4bit.unmerge`: dequantize_4bit - delta, then
    quantized again by `Params4bit`)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    peft_model = PeftModel.from_pretrained(model, adapter)
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            module.merged_adapters.append("default")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Unmerge lora module to 4-bit linear may get different generations"
        peft_model.unmerge_adapter()
    return peft_model.unload()


def _fp8_quantize(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' `Fp8Quantize` (amax / 448 per block). It passes through a weight its blocks do not divide, so a
    partial edge block is quantized on the weight padded with zeros (zeros change no block's amax) and cut back."""
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    rows, cols = weight.shape
    padded = torch.zeros(math.ceil(rows / block[0]) * block[0], math.ceil(cols / block[1]) * block[1])
    padded[:rows, :cols] = weight
    config = SimpleNamespace(quantization_config=SimpleNamespace(weight_block_size=list(block), scale_fmt=None))
    found = Fp8Quantize(config)._quantize_one("w.weight", padded)
    return found["w.weight"][:rows, :cols], found["w.weight_scale_inv"]


def _fp8_dequantize(stored: dict[str, torch.Tensor], name: str, block: tuple[int, int] | None) -> torch.Tensor:
    """The reference dequantization: transformers' `_dequantize_fp8_weight` for blocks, W8 x scale per row."""
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    if block is None:
        return stored[name].float() * stored[name + "_scale"]
    return _dequantize_fp8_weight(stored[name].clone(), stored[name + "_scale_inv"], list(block), torch.float32)


@pytest.mark.parametrize(("fmt", "block"), [("fp8", tuple(FP8_BLOCK)), ("fp8-channel", None)])
def test_fp8_unmerge_requantize_is_fp8quantize_of_peft_unmerge(
    bases: dict, tmp_path: Path, fmt: str, block: tuple[int, int] | None
) -> None:
    merged, back = _round_trip(bases, fmt, tmp_path)
    merged_config = json.loads((merged / "config.json").read_text())
    assert json.loads((back / "config.json").read_text())["quantization_config"] == merged_config["quantization_config"]
    written, stored = load_file(back / "model.safetensors"), load_file(merged / "model.safetensors")
    assert {n: (v.dtype, v.shape) for n, v in written.items()} == {n: (v.dtype, v.shape) for n, v in stored.items()}
    for name in (n for n in stored if not _edited(n)):  # untouched: MERGED's stored bytes
        assert torch.equal(written[name].view(torch.uint8), stored[name].view(torch.uint8)), name

    # The reference: PEFT's unmerge on the fp32 dequantized merged model, then transformers' quantizer.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(bases["bf16"], dtype=torch.float32).eval()
    weights = [n for n in stored if n.endswith("proj.weight")]
    model.load_state_dict({n: _fp8_dequantize(stored, n, block) for n in weights}, strict=False)
    unmerged = _peft_unmerge(model, bases["lora"]).state_dict()
    edited = [n for n in weights if _edited(n)]
    assert len(edited) == 6
    for name in edited:
        cols = unmerged[name].shape[-1]
        quantized, inverse = _fp8_quantize(unmerged[name], block or (1, cols))
        scale = written[name + ("_scale_inv" if block else "_scale")]
        assert torch.equal(written[name].view(torch.uint8), quantized.view(torch.uint8)), name  # bit for bit
        assert torch.equal(scale, inverse.reshape(scale.shape)), name


def test_nf4_unmerge_requantize_is_peft_linear4bit_unmerge(bases: dict, tmp_path: Path) -> None:
    merged, back = _round_trip(bases, "nf4", tmp_path)
    merged_config = json.loads((merged / "config.json").read_text())
    assert json.loads((back / "config.json").read_text())["quantization_config"] == merged_config["quantization_config"]
    written, stored = load_file(back / "model.safetensors"), load_file(merged / "model.safetensors")
    assert set(written) == set(stored)
    for name in (n for n in stored if not _edited(n)):  # untouched: MERGED's stored bytes, states included
        assert torch.equal(written[name], stored[name]), name
    # The quant state's JSON is padded with spaces to a length known before the weight is computed: from the JSON
    # itself plus room for its floats, so the padding the merge added is not carried on (it would grow each trip).
    states = [n for n in stored if "quant_state" in n]
    assert len(states) == 14
    for name in states:
        assert written[name].shape[0] <= len(bytes(stored[name].numpy()).rstrip(b" ")) + STATE_ROOM, name
    assert all(written[n].shape == stored[n].shape for n in stored if n not in states)

    reference = _peft_unmerge(load_bnb(merged), bases["lora"])
    expected, loaded = bnb_dequantized(reference), bnb_dequantized(load_bnb(back))  # transformers + bnb load it
    assert set(expected) == set(loaded) and len([n for n in expected if _edited(n)]) == 6
    for name, value in expected.items():
        assert torch.equal(loaded[name], value), name
    # And the stored codes and statistics themselves, against what Params4bit holds after PEFT's unmerge.
    modules = dict(reference.named_modules())
    for name in (n for n in expected if _edited(n)):
        weight = modules[name.removesuffix(".weight")].weight
        assert torch.equal(written[name].reshape(-1), weight.data.reshape(-1)), name
        for suffix, value in weight.quant_state.as_dict(packed=True).items():
            if "quant_state" not in suffix:  # the JSON is compared above through the dequantized values
                assert torch.equal(written[f"{name}.{suffix}"], value), (name, suffix)


def _block_max(value: torch.Tensor, size: int = 64) -> torch.Tensor:
    """Each element's NF4 block maximum |x| (bitsandbytes' blocks: 64 elements in row-major order)."""
    return value.reshape(-1, size).abs().amax(dim=1, keepdim=True).expand(-1, size).reshape(value.shape)


@pytest.mark.parametrize("fmt", ["fp8", "nf4"])
def test_unmerge_requantize_comes_back_near_the_base(bases: dict, tmp_path: Path, fmt: str) -> None:
    """Against the base the merge started from: the trip quantizes twice (merged m = Q(W + delta), then
    r = Q(m - delta)), so r - W = (r - (m - delta)) + (m - (W + delta)): two roundings, each bounded at the value
    it produced. Not bit for bit: the base's own codes come back only where both roundings land on them."""
    merged, back = _round_trip(bases, fmt, tmp_path)
    if fmt == "fp8":
        base, m_stored, r_stored = (load_file(p / "model.safetensors") for p in (bases["fp8"], merged, back))
        block = tuple(FP8_BLOCK)
        names = [n for n in base if _edited(n) and n.endswith("proj.weight")]
        for name in names:
            w, m, r = (_fp8_dequantize(s, name, block) for s in (base, m_stored, r_stored))
            steps = [_fp8_dequantize({**s, name: torch.ones_like(s[name])}, name, block) for s in (m_stored, r_stored)]
            # E4M3 round to nearest: half an ulp is at most 2^-4 of the rounded value (3 mantissa bits); below the
            # smallest normal (2^-6 x the block's scale) the step is the subnormal one, 2^-9 x the scale.
            bound = 2**-4 * (m.abs() + r.abs()) + 2**-10 * (steps[0] + steps[1])
            assert ((r - w).abs() <= bound * (1 + 2**-20)).all(), name  # fp32 products: relative slack
        return
    w_all, m_all, r_all = (bnb_dequantized(load_bnb(p)) for p in (bases["nf4"], merged, back))
    # Every width is a multiple of the 64-element block (BNB_WIDTHS), where bitsandbytes' CPU kernel is right.
    names = [n for n in w_all if _edited(n)]
    assert len(names) == 6
    for name in names:
        w, m, r = (t[name].float() for t in (w_all, m_all, r_all))
        # NF4 rounds x / absmax to the nearest of 16 levels; the widest gap between levels (-1 to -0.696) is 0.304,
        # so the error is at most 0.152 x the block's absmax, which the dequantized block's maximum |x| equals
        # (double quantization rounds the absmax itself, by under 1% here; measured worst 0.83 of this bound).
        bound = 0.152 * (_block_max(m) + _block_max(r))
        assert ((r - w).abs() <= bound).all(), name


def test_unmerge_requantize_refuses_by_name(bases: dict, tmp_path: Path) -> None:
    gptq = tmp_path / "gptq"
    write_format_base(bases["bf16"], gptq, "gptq")
    int8 = save_bnb(bases["bf16"], tmp_path / "int8", "int8")
    cases = [
        (gptq, "--requantize of gptq weights", "unmerge without --requantize"),
        (int8, "--requantize of bitsandbytes int8 weights", "unmerge without --requantize"),
        (bases["bf16"], "--requantize needs a quantized merged checkpoint", "unmerge without --requantize"),
    ]
    for i, (merged, message, fix) in enumerate(cases):
        out = tmp_path / f"out{i}"
        result = invoke("unmerge", merged, bases["lora"], out, "--device", "cpu", "--requantize")
        assert result.exit_code == 2, result.output
        assert message in result.output and fix in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and not out.exists()


def test_unmerge_requantize_refuses_check_against(bases: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ("--requantize", "--check-against", bases["fp8"])
    result = invoke("unmerge", bases["fp8"], bases["lora"], out, "--device", "cpu", *args)
    assert result.exit_code == 2 and "--check-against does not combine with --requantize" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()
