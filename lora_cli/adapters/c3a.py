"""C3A as PEFT defines it (`peft/tuners/c3a/layer.py`): a block-circulant delta from learned kernels.

delta = circulant(c3a_kernel) / in_features, the circulant built with PEFT's FFT construction in fp32. PEFT
rounds the delta to the base dtype before dividing and adding; loractl keeps fp32 and rounds once, so in fp32 it
matches PEFT bit for bit and in bf16 it is the more exact of the two.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.fft import fft, ifft

from lora_cli.adapters.additive import AdditiveEdit
from lora_cli.adapters.base import Adapter, AdapterKind, AdapterModule, EditContext, Shape, TensorEdit
from lora_cli.adapters.params import require


def circulant(kernel: torch.Tensor) -> torch.Tensor:
    """PEFT's `get_circulant_fast`: the (out, in) block-circulant matrix of kernels shaped (out/b, in/b, b)."""
    _, n, b = kernel.shape
    x = torch.eye(n * b, dtype=kernel.dtype, device=kernel.device)
    x = x.reshape(*x.shape[:-1], n, b)
    x = torch.einsum("...nb,mnb->...mb", ifft(x), fft(kernel))
    return fft(x).real.flatten(start_dim=1).T


class C3aEdit(AdditiveEdit):
    kind = "c3a"

    def __init__(self, adapter: Adapter, target: str, key: str) -> None:
        super().__init__(adapter, target, [key], f"block_size={adapter.weights.shape(key)[2]}")
        self.key = key

    def check(self, shape: Shape) -> str | None:
        rows, cols, block = self.adapter.weights.shape(self.key)
        if tuple(shape) == (rows * block, cols * block):
            return None
        return f"{self.target}: C3A kernels {(rows, cols, block)} vs base {tuple(shape)}"

    def peft_delta(self, shape: Shape, ctx: EditContext) -> torch.Tensor:
        return circulant(ctx.load(self.key).to(torch.float32)) / shape[-1]


class C3a(AdapterKind):
    peft_type = "C3A"
    param_roots = frozenset({"c3a_kernel"})

    def module_edits(
        self, adapter: Adapter, module: AdapterModule, base_shape: Callable[[str], Shape | None]
    ) -> list[TensorEdit]:
        (key,) = require(adapter, module, "c3a_kernel")
        return [C3aEdit(adapter, f"{module.path}.weight", key)]
