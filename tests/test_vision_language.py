"""Vision-language checkpoints: the adapter names the running model, the checkpoint keeps the older layout.

transformers 5.24 saves Qwen2-VL as `model.layers.N` and PaliGemma, Llava and Gemma-3 as
`language_model.model.layers.N`, while the running model (and so PEFT) says `model.language_model.layers.N`.
loractl maps one onto the other with transformers' own conversion rules; each case is compared with PEFT's
`merge_and_unload` followed by `save_pretrained`, tensor for tensor (exact: the same LoRA arithmetic, only the
names differ), and the merged checkpoint's logits, loaded by transformers, with the unmerged PeftModel's
(1e-4 absolute in fp32: the unmerged forward sums in another order).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel
from typer.testing import CliRunner

from lora_cli.cli.app import app
from lora_cli.errors import AdapterMismatchError
from lora_cli.merge import merge
from lora_cli.numerics import max_ulps
from lora_cli.sources import AdapterSpec, local_source
from lora_cli.unmerge import unmerge
from tests.builders import load_merged, logits_of, make_adapter, peft_logits
from tests.builders_models import VLMS, build

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
INPUTS = torch.tensor([[1, 5, 9, 17, 33, 2, 70, 11], [3, 3, 40, 41, 8, 90, 0, 12]])


def prepare(tmp_path: Path, name: str, dtype: torch.dtype = torch.float32):
    factory = functools.partial(build, VLMS, name, dtype)
    factory().save_pretrained(tmp_path / "base")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=ATTENTION)
    make_adapter(factory, config, tmp_path / "adapter")
    return factory


def peft_saved(factory, adapter: Path, out: Path) -> dict[str, torch.Tensor]:
    """The reference: PEFT merges, transformers saves (in the checkpoint layout it writes)."""
    PeftModel.from_pretrained(factory(), adapter).merge_and_unload().save_pretrained(out)
    return load_merged(out)


@pytest.mark.parametrize("name", sorted(VLMS))
def test_vision_language_merge_matches_peft_tensors_and_logits(tmp_path, name):
    factory = prepare(tmp_path, name)
    summary = merge(
        local_source(tmp_path / "base"), [AdapterSpec(local_source(tmp_path / "adapter"))], tmp_path / "out"
    )
    ours, ref = load_merged(tmp_path / "out"), peft_saved(factory, tmp_path / "adapter", tmp_path / "ref")
    base = load_merged(tmp_path / "base")
    assert set(ours) == set(ref) == set(base)  # the checkpoint's own layout is kept
    for key, tensor in ours.items():
        assert torch.equal(tensor, ref[key]), f"{key}: {max_ulps(tensor, ref[key])} ulps"
    changed = {k for k in ours if not torch.equal(ours[k], base[k])}
    assert summary.tensors_edited == len(changed) >= 8  # 2 text layers x q/k/v/o at least
    model_cls = type(factory())
    merged = model_cls.from_pretrained(tmp_path / "out")
    expected = peft_logits(factory, tmp_path / "adapter", INPUTS)
    assert torch.allclose(logits_of(merged, INPUTS), expected, atol=1e-4)


@pytest.mark.parametrize("name", sorted(VLMS))
def test_vision_language_bf16_merge_is_bit_identical_to_peft(tmp_path, name):
    factory = prepare(tmp_path, name, torch.bfloat16)
    merge(local_source(tmp_path / "base"), [AdapterSpec(local_source(tmp_path / "adapter"))], tmp_path / "out")
    ours, ref = load_merged(tmp_path / "out"), peft_saved(factory, tmp_path / "adapter", tmp_path / "ref")
    assert all(torch.equal(ours[k], ref[k]) for k in ours)


def test_vision_language_unmerge_gives_the_base_back(tmp_path):
    prepare(tmp_path, "qwen2_5_vl")
    adapter = [AdapterSpec(local_source(tmp_path / "adapter"))]
    merge(local_source(tmp_path / "base"), adapter, tmp_path / "merged")
    unmerge(local_source(tmp_path / "merged"), adapter, tmp_path / "out")
    base, merged, restored = (load_merged(tmp_path / d) for d in ("base", "merged", "out"))
    for key, original in base.items():
        # fp32 round trip: (W + d) - d is within 1 ulp of W at max(|W|, |W + d|)
        assert max_ulps(restored[key], original, at=torch.maximum(original.abs(), merged[key].abs())) <= 1.0, key


def test_vision_language_inspect_diff_and_memory_accept_the_pair(tmp_path):
    prepare(tmp_path, "llava")
    base, adapter, out = (str(tmp_path / d) for d in ("base", "adapter", "out"))
    runner = CliRunner()
    assert runner.invoke(app, ["merge", base, adapter, out]).exit_code == 0
    inspected = runner.invoke(app, ["inspect", adapter, "--base", base, "--json"])
    assert inspected.exit_code == 0, inspected.output
    checked = runner.invoke(app, ["diff", base, out, "--adapter", adapter, "--json"])
    assert checked.exit_code == 0, checked.output
    assert json.loads(checked.output)["adapter_check"]["verdict"] == "exact"
    memory = runner.invoke(app, ["memory", base, adapter, "--json"])
    assert memory.exit_code == 0, memory.output


def test_names_that_still_do_not_line_up_say_which_naming_each_side_uses(tmp_path):
    prepare(tmp_path, "qwen2_vl")
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    config["architectures"] = ["NoSuchModelForConditionalGeneration"]
    (tmp_path / "base" / "config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterMismatchError) as caught:
        merge(local_source(tmp_path / "base"), [AdapterSpec(local_source(tmp_path / "adapter"))], tmp_path / "out")
    message = str(caught.value)
    assert "model.language_model.layers.0" in message and "running model" in message
    assert "stores names like model.layers.0" in message and "NoSuchModelForConditionalGeneration" in message
