"""TinyLoRA as PEFT defines it (`peft/tuners/tinylora/layer.py`): a frozen SVD of each layer (A, B, saved) around an
r x r matrix R = sum_i v[i] P[i] made of a few trained numbers v, shared by groups of layers (`weight_tying`).

delta = transpose(B @ R @ A, fan_in_fan_out), with R = einsum("i,ijk->jk", v, P), in fp32. Which v a layer uses is
not saved: PEFT gives the layer at position i (in the model's module order, among the targets) the group
min(i // group_size, groups - 1), and draws its P from `projection_seed + i`. loractl recovers i from the saved P by
drawing those candidates the same way (torch.normal with a seeded CPU generator) and keeping the one equal to it
(after rounding to the base dtype, as PEFT's saved P is).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lora_cli.adapters.additive import AdditiveEdit
from lora_cli.adapters.base import SHARED_MODULE, Adapter, AdapterKind, AdapterModule, EditContext, Shape, TensorEdit
from lora_cli.adapters.params import config_number, missing_params, require
from lora_cli.errors import InputError, UnsupportedAdapterError

# The dtypes a base model may have rounded the drawn projections to before they were saved.
ROUNDINGS = (torch.float32, torch.bfloat16, torch.float16)


def projection(seed: int, u: int, rank: int) -> torch.Tensor:
    """PEFT's `_init_projection` for the layer whose seed is `projection_seed + position`."""
    generator = torch.Generator().manual_seed(seed)
    return torch.normal(mean=0.0, std=1.0 / (rank**0.5), size=(u, rank, rank), generator=generator)


class TinyloraEdit(AdditiveEdit):
    kind = "tinylora"

    def __init__(self, adapter: Adapter, target: str, a: str, b: str, p: str, v: str) -> None:
        self.a_key, self.b_key, self.p_key, self.v_key = a, b, p, v
        self.fan_in_fan_out = bool(adapter.config.get("fan_in_fan_out"))
        rank = adapter.weights.shape(a)[0]
        super().__init__(adapter, target, [a, b, p, v], f"r={rank} v={v.rsplit('.', 1)[-1]}")

    def expected_shape(self) -> Shape:
        a, b = self.adapter.weights.shape(self.a_key), self.adapter.weights.shape(self.b_key)
        return (a[1], b[0]) if self.fan_in_fan_out else (b[0], a[1])

    def check(self, shape: Shape) -> str | None:
        a, b = self.adapter.weights.shape(self.a_key), self.adapter.weights.shape(self.b_key)
        product = (b[0], a[1])
        if len(shape) != 2 or (product[::-1] if self.fan_in_fan_out else product) != tuple(shape):
            return f"{self.target}: TinyLoRA A {a}, B {b} vs base {tuple(shape)}"
        return None

    def peft_delta(self, shape: Shape, ctx: EditContext) -> torch.Tensor:
        v = ctx.load(self.v_key)
        r = torch.einsum("i,ijk->jk", v, ctx.load(self.p_key).to(v.dtype))
        delta = ctx.load(self.b_key) @ r @ ctx.load(self.a_key)
        return delta.T if self.fan_in_fan_out else delta


class Tinylora(AdapterKind):
    peft_type = "TINYLORA"
    param_roots = frozenset({"tinylora_A", "tinylora_B", "tinylora_P", "tinylora_v"})

    def module_edits(
        self, adapter: Adapter, module: AdapterModule, base_shape: Callable[[str], Shape | None]
    ) -> list[TensorEdit]:
        vectors = {name.split(".")[-1]: key for name, key in self.shared_params(adapter).items()}
        seed = int(config_number(adapter, "projection_seed", 42))
        tying = config_number(adapter, "weight_tying", 0.0)
        count = sum(path != SHARED_MODULE for path in adapter.modules)
        groups = max(1, round(count * (1.0 - tying)))
        group_size = max(1, count // groups)
        a, b = require(adapter, module, "tinylora_A", "tinylora_B")
        if not module.has("tinylora_P"):
            raise UnsupportedAdapterError(
                "this TinyLoRA adapter was saved without its projections (save_projection=False): PEFT draws "
                "them again from projection_seed and each layer's position in the model's module order, which "
                "the checkpoint does not record",
                path=adapter.weights.path,
                fix="re-save it with save_projection=True (the default), or merge it with PEFT",
            )
        p = module.params["tinylora_P"]
        position = self._position(adapter, p, seed, count)
        if position is None:
            raise InputError(
                f"{module.path}: its tinylora_P is none of the {count} projections projection_seed={seed} gives",
                path=adapter.weights.path,
                fix="the config and the weights do not belong together; re-save the adapter",
            )
        group = str(min(position // group_size, groups - 1))
        if group not in vectors:
            raise missing_params(adapter, "base_model", list(vectors), f"tinylora_v.{group}")
        return [TinyloraEdit(adapter, f"{module.path}.weight", a, b, p, vectors[group])]

    @staticmethod
    def _position(adapter: Adapter, p_key: str, seed: int, count: int) -> int | None:
        saved = adapter.weights.load(p_key)
        if saved.dim() != 3 or saved.shape[1] != saved.shape[2]:
            return None
        u, rank = saved.shape[0], saved.shape[1]
        for position in range(count):
            drawn = projection(seed + position, u, rank)
            # PEFT moves P to the base layer's dtype (bf16 or fp16 models) before its adapter weights are upcast.
            if any(torch.equal(drawn.to(dtype).to(saved.dtype), saved) for dtype in ROUNDINGS):
                return position
        return None
