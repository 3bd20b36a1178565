"""`diff --adapter`'s fast path keeps the verdicts and the numbers exact.

The check recomputes each edited tensor as the merge does and stops when it equals B bit for bit; otherwise it
measures only the elements that differ. Here B is a loractl merge with a few elements of one tensor moved by
1 and by 40 ulps: the residuals must equal the full elementwise measurement (every element of the fp32
recomputation against B, in ulps at max(|W|, |delta|, |values|)), exactly (same float64 arithmetic).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from lora_cli.adapters.base import Workspace
from lora_cli.diff import DiffOptions, diff
from lora_cli.engine import WriteOptions, apply_edits
from lora_cli.io.safetensors_file import read_tensor
from lora_cli.merge import merge
from lora_cli.numerics import ulps
from lora_cli.sources import AdapterSpec, local_source, prepare
from tests.builders import make_adapter, save_base, tiny_llama

CONFIG = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
MOVED = "model.layers.1.mlp.down_proj.weight"


def _full_measure(base: Path, lora: Path, b: dict[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
    """The residual of every edited tensor, every element measured (the check as it was before the fast path)."""
    prepared = prepare(local_source(base), [AdapterSpec(local_source(lora))])
    out = {}
    for planned in prepared.plan.edited:
        source = read_tensor(planned.source)
        expected = apply_edits(planned, source, torch.device("cpu"), Workspace()).cpu()
        theirs = b[planned.name]
        rounded = expected.to(theirs.dtype)
        w = source.to(expected.dtype)
        at = torch.maximum(w.abs(), (expected - w).abs())
        worst = float(ulps(theirs.reshape(-1), rounded.reshape(-1), theirs.dtype, at=at.reshape(-1)).max())
        out[planned.name] = (worst, float((theirs == rounded).double().mean()))
    return out


def test_residuals_equal_the_full_measurement(tmp_path: Path) -> None:
    save_base(tiny_llama(torch.bfloat16), tmp_path / "base")
    make_adapter(lambda: tiny_llama(torch.bfloat16), CONFIG, tmp_path / "lora")
    base, lora = local_source(tmp_path / "base"), local_source(tmp_path / "lora")
    merge(base, [AdapterSpec(lora)], tmp_path / "b", WriteOptions(device="cpu"))

    exact = diff(base, local_source(tmp_path / "b"), DiffOptions(device="cpu"), [AdapterSpec(lora)])
    assert exact.adapter_check.verdict == "exact"

    shutil.copytree(tmp_path / "b", tmp_path / "moved")
    state = load_file(tmp_path / "moved" / "model.safetensors")
    flat = state[MOVED].reshape(-1)
    bits = flat.view(torch.int16)
    bits[:3] += 1  # one bf16 step (same sign, so one ulp away at its own magnitude)
    bits[10] += 40
    save_file(state, tmp_path / "moved" / "model.safetensors", metadata={"format": "pt"})

    result = diff(base, local_source(tmp_path / "moved"), DiffOptions(device="cpu"), [AdapterSpec(lora)])
    reference = _full_measure(tmp_path / "base", tmp_path / "lora", state)
    measured = {r.name: (r.residual_max_ulps, r.residual_exact_share) for r in result.tensors if r.adapter_edited}
    assert measured == reference
    assert reference[MOVED][0] >= 2  # the nudge is visible, so the comparison above is not between zeros
    assert result.adapter_check.verdict == "fail"
    assert any(MOVED in problem for problem in result.adapter_check.problems)
