"""DeLoRA as PEFT defines it (`peft/tuners/delora/layer.py`): a LoRA whose rank-1 terms are normalised and bounded.

delta = (B @ diag(lambda / r / (|A_i| |B^i|)) @ A) * w_norm, each norm clamped at 1e-4 and w_norm the saved
per-input-column norms of the base weight; PEFT's `_compute_delta` in fp32. PEFT rounds the delta to the base dtype
before adding it; loractl rounds once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lora_cli.adapters.additive import AdditiveEdit
from lora_cli.adapters.base import Adapter, AdapterKind, AdapterModule, EditContext, Shape, TensorEdit
from lora_cli.adapters.params import require

PARAMS = ("delora_A", "delora_B", "delora_lambda", "delora_w_norm")


class DeloraEdit(AdditiveEdit):
    kind = "delora"

    def __init__(self, adapter: Adapter, target: str, params: dict[str, str]) -> None:
        self.rank = adapter.weights.shape(params["delora_A"])[0]
        super().__init__(adapter, target, [params[name] for name in PARAMS], f"r={self.rank}", rank=self.rank)
        self.params = params

    def expected_numel(self) -> int:
        return (
            self.adapter.weights.shape(self.params["delora_B"])[0]
            * self.adapter.weights.shape(self.params["delora_A"])[1]
        )

    def peft_delta(self, shape: Shape, ctx: EditContext) -> torch.Tensor:
        a, b, lam, w_norm = (ctx.load(self.params[name]) for name in PARAMS)
        a_norm = torch.clamp(a.norm(dim=1), min=1e-4)
        b_norm = torch.clamp(b.norm(dim=0), min=1e-4)
        diag = torch.diag_embed(lam / self.rank / (a_norm * b_norm))
        return ((b @ diag @ a) * w_norm.unsqueeze(0)).reshape(shape)


class Delora(AdapterKind):
    peft_type = "DELORA"
    param_roots = frozenset(PARAMS)

    def module_edits(
        self, adapter: Adapter, module: AdapterModule, base_shape: Callable[[str], Shape | None]
    ) -> list[TensorEdit]:
        require(adapter, module, *PARAMS)
        return [DeloraEdit(adapter, f"{module.path}.weight", module.params)]
