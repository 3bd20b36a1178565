"""FourierFT as PEFT defines it (`peft/tuners/fourierft/layer.py`): learned coefficients at random frequencies.

delta = transpose(real(ifft2(S)) * scaling, fan_in_fan_out), where S is an (out, in) spectrum holding the saved
coefficients at the first n positions of `torch.randperm(out * in)` seeded with `random_loc_seed`, exactly as
PEFT draws them (the positions are not saved; torch's CPU randperm is what makes them reproducible).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lora_cli.adapters.additive import AdditiveEdit
from lora_cli.adapters.base import Adapter, AdapterKind, AdapterModule, EditContext, Shape, TensorEdit
from lora_cli.adapters.params import config_number, require


class FourierftEdit(AdditiveEdit):
    kind = "fourierft"

    def __init__(self, adapter: Adapter, target: str, key: str, scaling: float, seed: int) -> None:
        n = adapter.weights.shape(key)[0]
        super().__init__(adapter, target, [key], f"n_frequency={n} scale={scaling:g}", scale=scaling)
        self.key, self.scaling, self.seed, self.n = key, scaling, seed, n
        self.fan_in_fan_out = bool(adapter.config.get("fan_in_fan_out"))

    def _features(self, shape: Shape) -> tuple[int, int]:
        return (shape[1], shape[0]) if self.fan_in_fan_out else (shape[0], shape[1])

    def check(self, shape: Shape) -> str | None:
        if len(shape) != 2:
            return f"{self.target}: FourierFT adapts linear layers only, base is {tuple(shape)}"
        if self.n > shape[0] * shape[1]:
            return f"{self.target}: {self.n} frequencies vs base {tuple(shape)}"
        return None

    def peft_delta(self, shape: Shape, ctx: EditContext) -> torch.Tensor:
        out, into = self._features(shape)
        generator = torch.Generator().manual_seed(self.seed)
        flat = torch.randperm(out * into, generator=generator)[: self.n]
        rows, cols = (flat // into).to(ctx.device), (flat % into).to(ctx.device)
        spectrum = ctx.load(self.key)
        dense = torch.zeros(out, into, device=ctx.device, dtype=torch.float32)
        dense[rows, cols] = spectrum.float()
        delta = (torch.fft.ifft2(dense).real * self.scaling).to(spectrum.dtype)
        return delta.T if self.fan_in_fan_out else delta


class Fourierft(AdapterKind):
    peft_type = "FOURIERFT"
    param_roots = frozenset({"fourierft_spectrum"})

    def module_edits(
        self, adapter: Adapter, module: AdapterModule, base_shape: Callable[[str], Shape | None]
    ) -> list[TensorEdit]:
        scaling = config_number(adapter, "scaling", 150.0)
        seed = int(config_number(adapter, "random_loc_seed", 777))
        (key,) = require(adapter, module, "fourierft_spectrum")
        return [FourierftEdit(adapter, f"{module.path}.weight", key, scaling, seed)]
