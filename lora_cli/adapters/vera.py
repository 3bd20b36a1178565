"""VeRA and PVeRA as PEFT defines them (`peft/tuners/vera/layer.py`): frozen random projections shared by every module,
scaled per module by two learned vectors.

delta = transpose((lambda_b * B[:out]) @ (lambda_d * A[:, :in]), fan_in_fan_out), in fp32. The projections are
saved once in the adapter file (`base_model.vera_A`/`vera_B`); for an adapter saved without them
(`save_projection=False`) loractl draws them again as PEFT does, from `projection_prng_key`, bit for bit. PVeRA
(`peft/tuners/pvera/layer.py`) is VeRA whose lambda_d and A carry a mean and a log-variance half; it merges by
the mean.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from lora_cli.adapters import regenerated
from lora_cli.adapters.additive import AdditiveEdit
from lora_cli.adapters.base import Adapter, AdapterKind, AdapterModule, EditContext, Shape, TensorEdit
from lora_cli.adapters.params import config_number, missing_params
from lora_cli.adapters.regenerated import largest_shape, with_tensors
from lora_cli.errors import UnsupportedAdapterError


class VeraEdit(AdditiveEdit):
    kind = "vera"
    prefix = "vera"
    # PVeRA's lambda_d and A hold a mean and a log-variance half; only B has the plain rank.
    rank_ratio = 1

    def __init__(self, adapter: Adapter, target: str, params: dict[str, str], shared: dict[str, str]) -> None:
        prefix = self.prefix
        self.lambda_b, self.lambda_d = params[f"{prefix}_lambda_b"], params[f"{prefix}_lambda_d"]
        self.proj_a, self.proj_b = shared[f"{prefix}_A"], shared[f"{prefix}_B"]
        self.fan_in_fan_out = bool(adapter.config.get("fan_in_fan_out"))
        rank = adapter.weights.shape(self.lambda_d)[0]
        super().__init__(adapter, target, [self.lambda_b, self.lambda_d, self.proj_a, self.proj_b], f"r={rank}")

    def _features(self, shape: Shape) -> tuple[int, int]:
        """(out, in) of the layer: Conv1D-style weights are stored transposed."""
        return (shape[1], shape[0]) if self.fan_in_fan_out else (shape[0], shape[1])

    def check(self, shape: Shape) -> str | None:
        weights = self.adapter.weights
        out_len = weights.shape(self.lambda_b)[0]
        rank = weights.shape(self.lambda_d)[0]
        a, b = weights.shape(self.proj_a), weights.shape(self.proj_b)
        if len(shape) != 2:
            return f"{self.target}: VeRA adapts linear layers only, base is {tuple(shape)}"
        out, into = self._features(shape)
        if out != out_len or a[0] != rank or b[1] * self.rank_ratio != rank or a[1] < into or b[0] < out:
            return f"{self.target}: VeRA lambda_b {out_len}, rank {rank}, projections {a}/{b} vs base {tuple(shape)}"
        return None

    def factors(self, ctx: EditContext, out: int, into: int) -> tuple[torch.Tensor, ...]:
        sliced_a = regenerated.load(ctx, self.proj_a)[:, :into]
        sliced_b = regenerated.load(ctx, self.proj_b)[:out, :]
        return ctx.load(self.lambda_b).unsqueeze(-1), sliced_b, ctx.load(self.lambda_d).unsqueeze(-1), sliced_a

    def peft_delta(self, shape: Shape, ctx: EditContext) -> torch.Tensor:
        out, into = self._features(shape)
        lambda_b, sliced_b, lambda_d, sliced_a = self.factors(ctx, out, into)
        delta = (lambda_b * sliced_b) @ (lambda_d * sliced_a)
        return delta.T if self.fan_in_fan_out else delta


class PveraEdit(VeraEdit):
    """PVeRA merges by its mean: the first half of lambda_d and of A's rows (PEFT's `get_delta_weight`)."""

    kind = "pvera"
    prefix = "pvera"
    rank_ratio = 2

    def factors(self, ctx: EditContext, out: int, into: int) -> tuple[torch.Tensor, ...]:
        lambda_b, sliced_b, lambda_d, sliced_a = super().factors(ctx, out, into)
        return lambda_b, sliced_b, lambda_d[: lambda_d.size(0) // 2, :], sliced_a[: sliced_a.size(0) // 2, :]


def kaiming(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's VeRA `_kaiming_init`: uniform in +-sqrt(3) * sqrt(2) / sqrt(fan_in), drawn from `generator`."""
    bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))
    with torch.no_grad():
        return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def draw_projections(adapter: Adapter, base_shape: Callable[[str], Shape | None]) -> dict[str, torch.Tensor]:
    """vera_A and vera_B as PEFT draws them when they were not saved (`_init_vera_A_vera_B`): sized by the largest
    (out, in) of the adapted layers, from a CPU generator seeded with `projection_prng_key`."""
    out, into = largest_shape(adapter, base_shape, "projections")
    rank = int(config_number(adapter, "r", 256))
    generator = torch.Generator(device="cpu").manual_seed(int(config_number(adapter, "projection_prng_key", 0)))
    vera_a = kaiming((rank, into), generator)
    vera_b = kaiming((out, rank), generator)
    return {"vera_A": vera_a, "vera_B": vera_b}


class Vera(AdapterKind):
    peft_type = "VERA"
    param_roots = frozenset({"vera_lambda_b", "vera_lambda_d", "vera_A", "vera_B"})
    edit_type: type[VeraEdit] = VeraEdit

    def edits(self, adapter: Adapter, base_shape: Callable[[str], Shape | None]) -> list[TensorEdit]:
        shared = self.shared_params(adapter)
        if self.peft_type == "VERA" and not {"vera_A", "vera_B"} <= set(shared):
            with_tensors(adapter, draw_projections(adapter, base_shape))
        return super().edits(adapter, base_shape)

    def check_adapter(self, adapter: Adapter) -> None:
        prefix = self.edit_type.prefix
        shared = self.shared_params(adapter)
        if f"{prefix}_A" not in shared or f"{prefix}_B" not in shared:
            raise UnsupportedAdapterError(
                f"this {self.peft_type} adapter was saved without its projections (save_projection=False)",
                path=adapter.weights.path,
                fix="re-save it with save_projection=True (the default)",
            )

    def module_edits(
        self, adapter: Adapter, module: AdapterModule, base_shape: Callable[[str], Shape | None]
    ) -> list[TensorEdit]:
        prefix = self.edit_type.prefix
        if not (module.has(f"{prefix}_lambda_b") and module.has(f"{prefix}_lambda_d")):
            raise missing_params(adapter, module.path, list(module.params), f"{prefix}_lambda_b and {prefix}_lambda_d")
        return [self.edit_type(adapter, f"{module.path}.weight", module.params, self.shared_params(adapter))]


class Pvera(Vera):
    peft_type = "PVERA"
    param_roots = frozenset({"pvera_lambda_b", "pvera_lambda_d", "pvera_A", "pvera_B"})
    edit_type = PveraEdit
