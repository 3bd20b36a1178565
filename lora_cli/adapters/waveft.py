"""WaveFT as PEFT defines it (`peft/tuners/waveft/layer.py`): learned wavelet coefficients at random positions, turned
into a weight change by one level of the inverse 2-D discrete wavelet transform.

PEFT's `get_delta_weight` in fp32: the saved coefficients go at the first n positions of
`torch.randperm(out * in)` seeded with `random_loc_seed` (not saved: torch's CPU randperm reproduces them), offset
into a spectrum padded by the family's reduction and to even sides; its four quarters (cA | cH / cV | cD) are
reconstructed with `waverec2d` (the reconstruction filters' outer products, a stride-2 transposed convolution, the
filter's overhang cropped), the centre cropped back to (out, in) and scaled. Without `use_idwt` the spectrum itself
is the delta. `fan_in_fan_out` layers get it transposed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lora_cli.adapters.additive import AdditiveEdit
from lora_cli.adapters.base import Adapter, AdapterKind, AdapterModule, EditContext, Shape, TensorEdit
from lora_cli.adapters.params import config_number, require
from lora_cli.adapters.wavelet_filters import COEFFICIENTS, REDUCTIONS
from lora_cli.errors import InputError


def reconstruction_filters(family: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(rec_lo, rec_hi) as PEFT's minimal `Wavelet` builds them (coiflets scaled by sqrt(2))."""
    base = COEFFICIENTS["db1" if family == "haar" else family]
    scale = 2**0.5 if family.startswith("coif") else 1.0
    scaled = [c * scale for c in base]
    rec_hi = [(-1) ** i * scaled[len(scaled) - 1 - i] for i in range(len(scaled))]
    return torch.tensor(scaled, dtype=dtype), torch.tensor(rec_hi, dtype=dtype)


def outer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.unsqueeze(torch.reshape(a, [-1]), dim=-1) * torch.unsqueeze(torch.reshape(b, [-1]), dim=0)


def waverec2d_one_level(ca: torch.Tensor, details: tuple[torch.Tensor, ...], family: str) -> torch.Tensor:
    """PEFT's `waverec2d` for a single level on a 2-D input."""
    rec_lo, rec_hi = reconstruction_filters(family, ca.dtype)
    rec_lo, rec_hi = rec_lo.to(ca.device), rec_hi.to(ca.device)
    length = rec_lo.shape[-1]
    rec_filt = torch.stack([outer(rec_lo, rec_lo), outer(rec_hi, rec_lo), outer(rec_lo, rec_hi), outer(rec_hi, rec_hi)])
    rec_filt = rec_filt.unsqueeze(1)
    stacked = torch.stack([ca.unsqueeze(0), *(d.unsqueeze(0) for d in details)], 1)
    res = torch.nn.functional.conv_transpose2d(stacked, rec_filt, stride=2).squeeze(1)
    pad = (2 * length - 3) // 2
    if pad > 0:
        res = res[..., pad:, :][..., :-pad, :][..., pad:][..., :-pad]
    return res.squeeze(0)


class WaveftEdit(AdditiveEdit):
    kind = "waveft"

    def __init__(self, adapter: Adapter, target: str, key: str) -> None:
        config = adapter.config
        self.key = key
        self.n = adapter.weights.shape(key)[0]
        self.scaling = config_number(adapter, "scaling", 25.0)
        self.seed = int(config_number(adapter, "random_loc_seed", 777))
        self.family = str(config.get("wavelet_family", "db1"))
        self.use_idwt = bool(config.get("use_idwt", True))
        self.fan_in_fan_out = bool(config.get("fan_in_fan_out"))
        detail = f"n_frequency={self.n} {self.family if self.use_idwt else 'no idwt'} scale={self.scaling:g}"
        super().__init__(adapter, target, [key], detail, scale=self.scaling)

    def _features(self, shape: Shape) -> tuple[int, int]:
        return (shape[1], shape[0]) if self.fan_in_fan_out else (shape[0], shape[1])

    def check(self, shape: Shape) -> str | None:
        if len(shape) != 2:
            return f"{self.target}: WaveFT adapts linear layers only, base is {tuple(shape)}"
        if self.n > shape[0] * shape[1]:
            return f"{self.target}: {self.n} coefficients vs base {tuple(shape)}"
        return None

    def peft_delta(self, shape: Shape, ctx: EditContext) -> torch.Tensor:
        out, into = self._features(shape)
        generator = torch.Generator().manual_seed(self.seed)
        flat = torch.randperm(out * into, generator=generator)[: self.n]
        indices = torch.stack([flat // into, flat % into], dim=0).to(ctx.device)
        spectrum = ctx.load(self.key)
        if not self.use_idwt:
            dense = torch.zeros(out, into, device=ctx.device, dtype=spectrum.dtype)
            dense[indices[0, :], indices[1, :]] = spectrum
            delta = dense * self.scaling
        else:
            rows, cols = REDUCTIONS[self.family]
            padded_out, padded_in = out + rows, into + cols
            padded_out += padded_out % 2
            padded_in += padded_in % 2
            padded = indices.clone()
            padded[0, :] += (padded_out - out) // 2
            padded[1, :] += (padded_in - into) // 2
            valid = (padded[0, :] < padded_out) & (padded[1, :] < padded_in)
            dense = torch.zeros(padded_out, padded_in, device=ctx.device, dtype=spectrum.dtype)
            dense[padded[0, valid], padded[1, valid]] = spectrum[valid]
            h2, w2 = padded_out // 2, padded_in // 2
            details = (dense[:h2, w2:], dense[h2:, :w2], dense[h2:, w2:])
            delta = waverec2d_one_level(dense[:h2, :w2], details, self.family) * self.scaling
            if delta.shape != (out, into):
                top, left = (delta.shape[0] - out) // 2, (delta.shape[1] - into) // 2
                delta = delta[top : top + out, left : left + into]
        return delta.T if self.fan_in_fan_out else delta


class Waveft(AdapterKind):
    peft_type = "WAVEFT"
    param_roots = frozenset({"waveft_spectrum"})

    def check_adapter(self, adapter: Adapter) -> None:
        family = str(adapter.config.get("wavelet_family", "db1"))
        if adapter.config.get("use_idwt", True) and family not in REDUCTIONS:
            raise InputError(
                f"wavelet_family {family!r} is not one PEFT's WaveFT knows",
                path=adapter.config_path,
                fix="use one of db1-db38, sym2-sym20, coif1-coif17",
            )

    def module_edits(
        self, adapter: Adapter, module: AdapterModule, base_shape: Callable[[str], Shape | None]
    ) -> list[TensorEdit]:
        (key,) = require(adapter, module, "waveft_spectrum")
        return [WaveftEdit(adapter, f"{module.path}.weight", key)]
