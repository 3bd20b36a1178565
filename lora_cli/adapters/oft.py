"""OFT as PEFT defines it (`peft/tuners/oft/layer.py`): the weight's input space is rotated by a block-diagonal
orthogonal matrix R built from skew-symmetric blocks.

Each block is the Cayley transform of skew(Q), by PEFT's truncated Neumann series (the default) or by an exact
solve; COFT first projects Q into an eps-ball. The merge is W' = (R @ W.view(out, -1).T).T in fp32, as PEFT's
`torch.mm(oft_mat, weight.t())`, so Linear and square-kernel Conv2d weights alike; an embedding's rows are rotated
from the right, W' = W @ R (PEFT's `Embedding.merge`). Undo solves with R.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from lora_cli.adapters.base import Adapter, AdapterKind, AdapterModule, EditContext, Shape, TensorEdit
from lora_cli.adapters.params import config_number, refuse_weight, require


def block_size_of(n_elements: int) -> int:
    """The block size b with b (b - 1) / 2 = n_elements (the strict upper triangle of a b x b block)."""
    return (1 + math.isqrt(1 + 8 * n_elements)) // 2


def skew(vec: torch.Tensor, block: int) -> torch.Tensor:
    rows, cols = torch.triu_indices(block, block, 1, device=vec.device)
    matrix = torch.zeros(vec.shape[0], block, block, device=vec.device, dtype=vec.dtype)
    matrix[:, rows, cols] = vec
    return matrix - matrix.transpose(-2, -1)


def project(q: torch.Tensor, block: int, eps: float) -> torch.Tensor:
    """PEFT's `_project_batch` for COFT: pull each skew block back within eps (scaled by the block count)."""
    oft_r = skew(q, block)
    eps = eps * 1 / torch.sqrt(torch.tensor(oft_r.shape[0]))
    zero = torch.zeros((oft_r.size(1), oft_r.size(1)), device=oft_r.device, dtype=oft_r.dtype).unsqueeze(0)
    zero = zero.expand_as(oft_r)
    diff = oft_r - zero
    norm_diff = torch.norm(oft_r - zero, dim=(1, 2), keepdim=True)
    out = torch.where((norm_diff <= eps).bool(), oft_r, zero + eps * (diff / norm_diff))
    rows, cols = torch.triu_indices(block, block, 1, device=q.device)
    return out[:, rows, cols]


def cayley(q: torch.Tensor, block: int, neumann: bool, terms: int) -> torch.Tensor:
    """PEFT's `_cayley_batch`, operation for operation."""
    b = q.shape[0]
    q_skew = skew(q, block)
    if neumann:
        r = torch.eye(block, device=q.device, dtype=q.dtype).repeat(b, 1, 1)
        if terms > 1:
            r.add_(q_skew, alpha=2.0)
            if terms > 2:
                q_squared = torch.bmm(q_skew, q_skew)
                r.add_(q_squared, alpha=2.0)
                q_power = q_squared
                for _ in range(3, terms - 1):
                    q_power = torch.bmm(q_power, q_skew)
                    r.add_(q_power, alpha=2.0)
                q_power = torch.bmm(q_power, q_skew)
                r.add_(q_power)
        return r
    eye = torch.eye(block, device=q.device, dtype=q.dtype).unsqueeze(0).expand(b, block, block)
    return torch.linalg.solve(eye + q_skew, eye - q_skew, left=False)


class OftEdit(TensorEdit):
    kind = "oft"

    def __init__(self, adapter: Adapter, target: str, key: str) -> None:
        super().__init__(adapter, target)
        self.key = key
        stored = adapter.weights.shape(key)
        self.blocks_stored, self.block = stored[0], block_size_of(stored[1])
        config = adapter.config
        self.coft = bool(config.get("coft"))
        self.eps = config_number(adapter, "eps", 6e-5)
        self.neumann = bool(config.get("use_cayley_neumann", True))
        self.terms = int(config_number(adapter, "num_cayley_neumann_terms", 5))

    def adapter_keys(self) -> list[str]:
        return [self.key]

    def check(self, shape: Shape) -> str | None:
        features = math.prod(shape[1:])
        square = len(shape) == 2 or (len(shape) == 4 and shape[2] == shape[3])
        fits = square and features % self.block == 0
        fits = fits and self.blocks_stored in (1, features // self.block)
        return None if fits else f"{self.target}: OFT {self.blocks_stored} blocks of {self.block} vs {tuple(shape)}"

    def rotation(self, features: int, ctx: EditContext) -> torch.Tensor:
        q = ctx.load(self.key)
        if self.coft:
            with torch.no_grad():
                q = project(q, self.block, self.eps)
        blocks = cayley(q, self.block, self.neumann, self.terms)
        count = features // self.block
        return torch.block_diag(*[blocks[0 if blocks.shape[0] == 1 else i] for i in range(count)])

    def apply(self, weight: torch.Tensor, ctx: EditContext) -> torch.Tensor:
        flat = weight.reshape(weight.shape[0], -1)
        rotation = self.rotation(flat.shape[1], ctx)
        return torch.mm(rotation, flat.t()).t().reshape(weight.shape)

    def revert(self, merged: torch.Tensor, ctx: EditContext, base: torch.Tensor | None = None) -> torch.Tensor:
        flat = merged.reshape(merged.shape[0], -1)
        rotation = self.rotation(flat.shape[1], ctx)
        return torch.linalg.solve(rotation, flat.t()).t().reshape(merged.shape)

    def describe(self) -> str:
        return f"oft blocks={self.blocks_stored} block_size={self.block}"


class OftEmbeddingEdit(OftEdit):
    """PEFT's `Embedding.merge`: the embedding dimension is rotated, W' = W @ R (a linear layer gets W @ R.T)."""

    def check(self, shape: Shape) -> str | None:
        if len(shape) != 2:
            return f"{self.target}: OFT on an embedding needs a 2-D weight, base is {tuple(shape)}"
        return super().check(shape)

    def apply(self, weight: torch.Tensor, ctx: EditContext) -> torch.Tensor:
        return torch.mm(weight, self.rotation(weight.shape[1], ctx))

    def revert(self, merged: torch.Tensor, ctx: EditContext, base: torch.Tensor | None = None) -> torch.Tensor:
        return torch.linalg.solve(self.rotation(merged.shape[1], ctx), merged, left=False)


class Oft(AdapterKind):
    peft_type = "OFT"
    param_roots = frozenset({"oft_R", "oft_embedding_R"})

    def check_adapter(self, adapter: Adapter) -> None:
        refuse_weight(adapter, "OFT", "an OFT rotation has no delta to scale")

    def module_edits(
        self, adapter: Adapter, module: AdapterModule, base_shape: Callable[[str], Shape | None]
    ) -> list[TensorEdit]:
        if module.has("oft_embedding_R.weight"):
            return [OftEmbeddingEdit(adapter, f"{module.path}.weight", module.params["oft_embedding_R.weight"])]
        (key,) = require(adapter, module, "oft_R.weight")
        return [OftEdit(adapter, f"{module.path}.weight", key)]
