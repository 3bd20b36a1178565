"""Merging onto GPTQ (desc_act), AWQ, compressed-tensors and bitsandbytes FP4/int8 bases: the merged tensors are PEFT
on the reference dequantized base (fp32 sum, rounded once to bf16)."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import save_file

from tests.builders import load_merged, make_adapter, peft_merged_state, tiny_llama
from tests.builders_quant import (
    BNB_WIDTHS,
    TARGETS,
    bnb_dequantized,
    load_bnb,
    save_bnb,
    with_weights,
    write_format_base,
)
from tests.test_quant_merge import invoke

FACTORY = functools.partial(tiny_llama, torch.bfloat16, **BNB_WIDTHS)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("formats")
    FACTORY().save_pretrained(root / "bf16")
    make_adapter(FACTORY, LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False), root / "lora", scale=0.1)
    return root


@pytest.mark.parametrize("fmt", ["gptq", "awq", "compressed", "fp4", "int8"])
def test_merge_onto_format_is_peft_on_the_dequantized_base(root: Path, tmp_path: Path, fmt: str) -> None:
    base = tmp_path / fmt
    if fmt in ("fp4", "int8"):
        save_bnb(root / "bf16", base, fmt)
        reference = load_merged(root / "bf16") | bnb_dequantized(load_bnb(base))
    else:
        reference = write_format_base(root / "bf16", base, fmt)
    plain = tmp_path / "reference-base"
    plain.mkdir()
    save_file({k: v.float().contiguous() for k, v in reference.items()}, plain / "model.safetensors")
    (plain / "config.json").write_text((root / "bf16" / "config.json").read_text())

    out = tmp_path / "merged"
    result = invoke("merge", base, root / "lora", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    merged = load_merged(out)
    expected = peft_merged_state(with_weights(plain, torch.float32), root / "lora")
    assert set(merged) == set(expected)
    for name, value in merged.items():
        assert value.dtype == torch.bfloat16
        # Dequantized (fp16/bf16/fp32 exactly in fp32) + fp32 delta, rounded once: PEFT in fp32 rounded once.
        assert torch.equal(value, expected[name].to(torch.bfloat16)), name
