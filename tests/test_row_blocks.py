"""The row-blocked fused add (`engine._add_rows`): the same bytes as the whole delta, block after block.

The CPU merge forms LoRA's `(B @ A) * scaling` a block of rows at a time and adds it to W in cache. That is only
allowed because a block of B's rows times A gives exactly those rows of B @ A: these tests pin it on the shapes
the benchmark merges, at every block size the engine can choose, and end to end against the whole-delta path.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_cli import engine
from lora_cli.adapters.lora import LoraEdit
from lora_cli.merge import merge
from lora_cli.sources import AdapterSpec, local_source


@pytest.mark.parametrize(("rows", "cols", "rank"), [(5632, 2048, 64), (2048, 5632, 64), (1000, 777, 16), (9, 40, 3)])
def test_blocks_of_rows_give_the_whole_products_bytes(rows: int, cols: int, rank: int) -> None:
    generator = torch.Generator().manual_seed(rows)
    b = torch.randn(rows, rank, generator=generator) * 0.02
    a = torch.randn(rank, cols, generator=generator) * 0.02
    whole = (b @ a) * 0.5
    for step in sorted({engine.MIN_BLOCK_ROWS, 13, 64, 500, rows}):
        for start in range(0, rows, step):
            stop = min(start + step, rows)
            if 0 < rows - stop < engine.MIN_BLOCK_ROWS:
                stop = rows  # the engine's rule: no short block at the end
            block = torch.matmul(b[start:stop], a, out=torch.empty(stop - start, cols)).mul_(0.5)
            assert torch.equal(block, whole[start:stop]), (step, start)
            if stop == rows:
                break


def _write_inputs(root: Path, dtype: torch.dtype, rows: int, cols: int, rank: int) -> tuple[Path, Path]:
    generator = torch.Generator().manual_seed(1)
    base = root / "base"
    base.mkdir()
    weights = {
        "q.weight": torch.randn(rows, cols, generator=generator).to(dtype),
        "k.weight": torch.randn(rows + 5, cols, generator=generator).to(dtype),
    }
    save_file(weights, base / "model.safetensors")
    adapter = root / "adapter"
    adapter.mkdir()
    factors = {}
    for name, height in (("q", rows), ("k", rows + 5)):
        factors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, cols, generator=generator) * 0.1
        factors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(height, rank, generator=generator) * 0.1
    save_file(factors, adapter / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 3 * rank, "target_modules": ["q", "k"]}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return base, adapter


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_row_blocked_merge_matches_the_whole_delta_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    base, adapter = _write_inputs(tmp_path, dtype, rows=301, cols=96, rank=8)
    # Two adapters (a chain of two deltas, one at ADAPTER@0.7): both block buffers are used.
    specs = [AdapterSpec(local_source(adapter)), AdapterSpec(local_source(adapter), weight=0.7)]
    # 16 rows of 96 per block: many blocks, and 301 rows leave a 13-row block, 318 rows a stretched last one.
    monkeypatch.setattr(engine, "FUSED_CHUNK_ELEMENTS_PER_THREAD", 16 * 96 // 4)
    assert engine.fused_block_rows((301, 96)) == 16
    calls: list[tuple[int, int]] = []
    row_delta = LoraEdit.row_delta

    def counting(self: LoraEdit, shape: tuple[int, ...], ctx: object) -> object:
        rows = row_delta(self, shape, ctx)  # type: ignore[arg-type]

        def counted(start: int, stop: int, into: torch.Tensor) -> torch.Tensor:
            calls.append((start, stop))
            return rows(start, stop, into)

        return counted

    monkeypatch.setattr(LoraEdit, "row_delta", counting)
    merge(local_source(base), specs, tmp_path / "rows")
    assert len(calls) > 2 * 19 and min(stop - start for start, stop in calls) >= engine.MIN_BLOCK_ROWS
    monkeypatch.setattr(LoraEdit, "row_blocks", lambda self: False)
    merge(local_source(base), specs, tmp_path / "whole")
    by_rows = load_file(tmp_path / "rows" / "model.safetensors")
    whole = load_file(tmp_path / "whole" / "model.safetensors")
    original = load_file(base / "model.safetensors")
    for name, tensor in whole.items():
        assert torch.equal(by_rows[name].view(torch.uint8), tensor.view(torch.uint8)), name
        assert not torch.equal(tensor, original[name])
