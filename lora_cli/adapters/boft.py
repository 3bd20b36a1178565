"""BOFT as PEFT defines it (`peft/tuners/boft/layer.py`): a product of butterfly-permuted block-diagonal rotations,
then a per-output scale.

Each block is the exact Cayley transform of the skew part of `boft_R`; factor i is P_i @ blockdiag @ P_i^T with
PEFT's block butterfly permutation P_i (the identity for a single factor, which is all PEFT trains on CPU). The
merge is W' = (M @ W.view(out, -1).T).T * boft_s, in fp32 as PEFT does it; undo solves with M and divides by s.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from lora_cli.adapters.base import Adapter, AdapterKind, AdapterModule, EditContext, Shape, TensorEdit
from lora_cli.adapters.params import refuse_weight, require
from lora_cli.errors import NotRevertibleError


def butterfly_perm(n: int, b: int, r: int, n_butterfly_factor: int) -> torch.Tensor:
    """PEFT's `block_butterfly_perm`, verbatim in effect: the index order of one butterfly factor."""
    if n_butterfly_factor == 0:
        return torch.arange(n)
    block_size = int(n // b)
    indices = torch.arange(n)
    step = block_size / r
    initial_order = torch.arange(block_size)
    sorted_order = torch.empty(block_size, dtype=torch.long)
    sorted_seq = torch.cat((torch.arange(0, step, 2), torch.arange(1, step, 2)), dim=0)
    for i, pos in enumerate(sorted_seq):
        sorted_order[int(i * r) : int(i * r + r)] = initial_order[int(pos * r) : int(pos * r + r)]
    for i in range(0, n, block_size):
        indices[i : i + block_size] = indices[i : i + block_size][sorted_order]
    return indices


def perm_matrix(indices: torch.Tensor) -> torch.Tensor:
    n = len(indices)
    matrix = torch.zeros((n, n))
    matrix[torch.arange(n), indices] = 1
    return matrix


def butterfly_rotation(boft_r: torch.Tensor) -> torch.Tensor:
    """The (dim, dim) rotation M from `boft_R` of shape (factors, blocks, b, b), in PEFT's order."""
    factors, blocks, size, _ = boft_r.shape
    data = boft_r.reshape(factors * blocks, size, size)
    skew = 0.5 * (data - data.transpose(1, 2))
    eye = torch.eye(size, device=data.device, dtype=data.dtype).unsqueeze(0).expand(factors * blocks, size, size)
    rotations = torch.linalg.solve(eye + skew, eye - skew, left=False).view(factors, blocks, size, size)
    diagonal = torch.stack([torch.block_diag(*torch.unbind(rotations[i])) for i in range(factors)])
    dim = blocks * size
    perms = torch.stack(
        [perm_matrix(butterfly_perm(dim, int(blocks / 2**i), int(size / 2), factors - 1)) for i in range(factors)]
    ).to(device=diagonal.device, dtype=diagonal.dtype)
    batch = torch.bmm(perms, torch.bmm(diagonal, perms.permute(0, 2, 1)))
    rotation = batch[0]
    for i in range(1, factors):
        rotation = batch[i] @ rotation
    return rotation


class BoftEdit(TensorEdit):
    kind = "boft"

    def __init__(self, adapter: Adapter, target: str, r_key: str, s_key: str) -> None:
        super().__init__(adapter, target)
        self.r_key, self.s_key = r_key, s_key

    def adapter_keys(self) -> list[str]:
        return [self.r_key, self.s_key]

    def check(self, shape: Shape) -> str | None:
        factors, blocks, size, _ = self.adapter.weights.shape(self.r_key)
        scale = math.prod(self.adapter.weights.shape(self.s_key))
        square = len(shape) == 2 or (len(shape) == 4 and shape[2] == shape[3])
        if square and math.prod(shape[1:]) == blocks * size and scale == shape[0]:
            return None
        return f"{self.target}: BOFT {factors}x{blocks} blocks of {size} and {scale} scales vs base {tuple(shape)}"

    def _parts(self, ctx: EditContext) -> tuple[torch.Tensor, torch.Tensor]:
        return butterfly_rotation(ctx.load(self.r_key)), ctx.load(self.s_key).reshape(-1, 1)

    def apply(self, weight: torch.Tensor, ctx: EditContext) -> torch.Tensor:
        rotation, scale = self._parts(ctx)
        flat = weight.reshape(weight.shape[0], -1)
        return (torch.mm(rotation, flat.t()).t() * scale).reshape(weight.shape)

    def revert(self, merged: torch.Tensor, ctx: EditContext, base: torch.Tensor | None = None) -> torch.Tensor:
        rotation, scale = self._parts(ctx)
        if bool((scale == 0).any()):
            raise NotRevertibleError(f"{self.target}: a BOFT scale is zero", path=self.adapter.ref, fix="pass --base")
        flat = merged.reshape(merged.shape[0], -1) / scale
        return torch.linalg.solve(rotation, flat.t()).t().reshape(merged.shape)

    def describe(self) -> str:
        factors, blocks, size, _ = self.adapter.weights.shape(self.r_key)
        return f"boft factors={factors} blocks={blocks} block_size={size}"


class Boft(AdapterKind):
    peft_type = "BOFT"
    param_roots = frozenset({"boft_R", "boft_s"})

    def check_adapter(self, adapter: Adapter) -> None:
        refuse_weight(adapter, "BOFT", "a BOFT rotation has no delta to scale")

    def module_edits(
        self, adapter: Adapter, module: AdapterModule, base_shape: Callable[[str], Shape | None]
    ) -> list[TensorEdit]:
        rotation, scale = require(adapter, module, "boft_R", "boft_s")
        return [BoftEdit(adapter, f"{module.path}.weight", rotation, scale)]
