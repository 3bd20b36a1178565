"""MiSS as PEFT defines it (`peft/tuners/miss/layer.py`): a shared block added to every r-column slice of the
weight (the default and `mini` forms), or block-wise W_ij + W_ij @ B_i + B_i (`init_weights="bat"`).

Default: W'[o, j r + k] = W[o, j r + k] + B[k, o], the last, partial slice taking B's first columns; `mini` tiles a
(r, mini_r) block along the outputs first. `bat` reads the base blocks, so its undo solves with I + B as PEFT's
unmerge does. All in fp32, one rounding, as PEFT's CPU merge.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lora_cli.adapters.additive import AdditiveEdit
from lora_cli.adapters.base import Adapter, AdapterKind, AdapterModule, EditContext, Shape, TensorEdit
from lora_cli.adapters.params import refuse_weight, require


class MissEdit(AdditiveEdit):
    """The default and `mini` forms: a delta that tiles the block B^T across the input columns."""

    kind = "miss"

    def __init__(self, adapter: Adapter, target: str, key: str) -> None:
        rank = adapter.weights.shape(key)[0]
        super().__init__(adapter, target, [key], f"r={rank}")
        self.key = key

    def check(self, shape: Shape) -> str | None:
        rank, width = self.adapter.weights.shape(self.key)
        if len(shape) == 2 and shape[0] % width == 0 and rank <= shape[1]:
            return None
        return f"{self.target}: MiSS block {(rank, width)} vs base {tuple(shape)}"

    def peft_delta(self, shape: Shape, ctx: EditContext) -> torch.Tensor:
        block = ctx.load(self.key)
        out, into = shape
        block = block.repeat(1, out // block.shape[1])  # `mini`: tile the narrow block along the outputs
        rank = block.shape[0]
        return block.t().repeat(1, -(-into // rank))[:, :into]


class MissBatEdit(TensorEdit):
    """`bat`: for each (r x r) block W_ij of the weight, W_ij + W_ij @ B_i + B_i."""

    kind = "miss_bat"

    def __init__(self, adapter: Adapter, target: str, key: str) -> None:
        super().__init__(adapter, target)
        self.key = key

    def adapter_keys(self) -> list[str]:
        return [self.key]

    def check(self, shape: Shape) -> str | None:
        blocks, rank, _ = self.adapter.weights.shape(self.key)
        if len(shape) == 2 and shape[0] == blocks * rank and shape[1] % rank == 0:
            return None
        return f"{self.target}: MiSS bat blocks {(blocks, rank, rank)} vs base {tuple(shape)}"

    def apply(self, weight: torch.Tensor, ctx: EditContext) -> torch.Tensor:
        block = ctx.load(self.key)
        rank = block.size(-1)
        out, into = weight.shape
        blocks = weight.reshape(out // rank, rank, into // rank, rank).permute(2, 0, 1, 3)
        result = blocks @ block + block
        return weight + result.permute(1, 2, 0, 3).reshape(weight.shape)

    def revert(self, merged: torch.Tensor, ctx: EditContext, base: torch.Tensor | None = None) -> torch.Tensor:
        block = ctx.load(self.key)
        rank = block.size(-1)
        out, into = merged.shape
        blocks = merged.reshape(out // rank, rank, into // rank, rank).permute(2, 0, 1, 3)
        eye = torch.eye(rank, device=block.device, dtype=block.dtype)
        # W' = W (I + B) + B, block by block: W = (W' - B) (I + B)^-1.
        restored = torch.linalg.solve(eye + block, blocks - block, left=False)
        return restored.permute(1, 2, 0, 3).reshape(merged.shape)


class Miss(AdapterKind):
    peft_type = "MISS"
    param_roots = frozenset({"miss_block"})

    def check_adapter(self, adapter: Adapter) -> None:
        if _is_bat(adapter):
            refuse_weight(adapter, "MiSS", "MiSS bat multiplies the base blocks")

    def module_edits(
        self, adapter: Adapter, module: AdapterModule, base_shape: Callable[[str], Shape | None]
    ) -> list[TensorEdit]:
        (key,) = require(adapter, module, "miss_block")
        edit_type = MissBatEdit if _is_bat(adapter) else MissEdit
        return [edit_type(adapter, f"{module.path}.weight", key)]


def _is_bat(adapter: Adapter) -> bool:
    return adapter.config.get("init_weights") == "bat"
