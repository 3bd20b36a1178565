"""LoHa as PEFT defines it (`peft/tuners/loha/layer.py`): a Hadamard product of two low-rank products.

delta = ((w1_a @ w1_b) * (w2_a @ w2_b)) * alpha / r, reshaped to the base weight; convolutions trained with
`use_effective_conv2d` carry CP cores `hada_t1/t2` and rebuild each factor with PEFT's einsum. Same operations in
the same order as PEFT, in fp32, so merged tensors match its `merge_and_unload` bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from lora_cli.adapters.additive import AdditiveEdit
from lora_cli.adapters.base import Adapter, AdapterKind, AdapterModule, EditContext, Shape, TensorEdit
from lora_cli.adapters.params import config_number, mismatched_rank, missing_params
from lora_cli.errors import InputError

FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
CP_CORES = ("hada_t1", "hada_t2")


class LohaEdit(AdditiveEdit):
    kind = "loha"

    def __init__(self, adapter: Adapter, target: str, params: dict[str, str], scaling: float, rank: int) -> None:
        keys = [params[name] for name in (*FACTORS, *CP_CORES) if name in params]
        super().__init__(adapter, target, keys, f"r={rank} scale={scaling:g}", rank=rank, scale=scaling)
        self.params = params
        self.scaling = scaling
        self.cp = all(name in params for name in CP_CORES)

    def expected_numel(self) -> int:
        shape = self.adapter.weights.shape
        w1a, w1b = shape(self.params["hada_w1_a"]), shape(self.params["hada_w1_b"])
        if self.cp:
            return w1a[1] * w1b[1] * math.prod(shape(self.params["hada_t1"])[2:])
        return w1a[0] * w1b[1]

    def peft_delta(self, shape: Shape, ctx: EditContext) -> torch.Tensor:
        w1a, w1b, w2a, w2b = (ctx.load(self.params[name]) for name in FACTORS)
        scale = torch.tensor(self.scaling, dtype=w1a.dtype, device=w1a.device)  # PEFT: torch.tensor(scaling)
        if self.cp:
            t1, t2 = ctx.load(self.params["hada_t1"]), ctx.load(self.params["hada_t2"])
            rebuild1 = torch.einsum("i j k l, j r, i p -> p r k l", t1, w1b, w1a)
            rebuild2 = torch.einsum("i j k l, j r, i p -> p r k l", t2, w2b, w2a)
            delta = rebuild1 * rebuild2 * scale
        else:
            delta = ((w1a @ w1b) * (w2a @ w2b)) * scale
        return delta.reshape(shape)


def lycoris_scaling(adapter: Adapter, module_path: str) -> tuple[float, int]:
    """LyCORIS types' `alpha / r`, both possibly overridden per module by `alpha_pattern`/`rank_pattern`."""
    rank = config_number(adapter, "r", 8, pattern="rank_pattern", module_path=module_path)
    alpha = config_number(adapter, "alpha", 8, pattern="alpha_pattern", module_path=module_path)
    if rank <= 0 or rank != int(rank):
        raise InputError(
            f"r must be a positive integer, got {rank!r}",
            path=adapter.config_path,
            fix="set it in adapter_config.json to the value the adapter was trained with, or re-save the adapter",
        )
    return alpha / int(rank), int(rank)


class Loha(AdapterKind):
    peft_type = "LOHA"
    param_roots = frozenset({*FACTORS, *CP_CORES})

    def module_edits(
        self, adapter: Adapter, module: AdapterModule, base_shape: Callable[[str], Shape | None]
    ) -> list[TensorEdit]:
        if not all(module.has(name) for name in FACTORS):
            raise missing_params(adapter, module.path, list(module.params), "all four hada_w factors")
        scaling, rank = lycoris_scaling(adapter, module.path)
        stored = adapter.weights.shape(module.params["hada_w1_b"])[0]
        if stored != rank:
            raise mismatched_rank(adapter, module.path, rank, "hada_w1_b", stored)
        return [LohaEdit(adapter, f"{module.path}.weight", module.params, scaling, rank)]
