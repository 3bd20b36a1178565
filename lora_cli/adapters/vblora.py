"""VB-LoRA as PEFT defines it (`peft/tuners/vblora/layer.py`): LoRA factors assembled from a vector bank shared by
every module, each sub-vector a softmax over its top-k logits.

A = mix(logits_A).reshape(r, -1), B = mix(logits_B).transpose(1, 2).reshape(-1, r), delta = transpose(B @ A,
fan_in_fan_out), in fp32; the bank is saved once for the model (`base_model.vblora_vector_bank`). Adapters saved
with `save_only_topk_weights` keep only the top-k entries, which loractl does not read.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from lora_cli.adapters.additive import AdditiveEdit
from lora_cli.adapters.base import Adapter, AdapterKind, AdapterModule, EditContext, Shape, TensorEdit
from lora_cli.adapters.params import config_number, missing_params
from lora_cli.errors import UnsupportedAdapterError

BANK = "vblora_vector_bank"


def mix(logits: torch.Tensor, bank: torch.Tensor, topk: int) -> torch.Tensor:
    """PEFT's `_get_low_rank_matrix`: each sub-vector is the softmax-weighted sum of its top-k bank vectors."""
    top_k_logits, indices = logits.topk(topk, dim=-1)
    weights = F.softmax(top_k_logits, dim=-1)
    return (weights.unsqueeze(-1) * bank[indices]).sum(-2)


class VbloraEdit(AdditiveEdit):
    kind = "vblora"

    def __init__(self, adapter: Adapter, target: str, a_key: str, b_key: str, bank_key: str, topk: int) -> None:
        rank = adapter.weights.shape(a_key)[0]
        super().__init__(adapter, target, [a_key, b_key, bank_key], f"r={rank} topk={topk}")
        self.a_key, self.b_key, self.bank_key, self.topk = a_key, b_key, bank_key, topk
        self.fan_in_fan_out = bool(adapter.config.get("fan_in_fan_out"))

    def expected_numel(self) -> int:
        length = self.adapter.weights.shape(self.bank_key)[1]
        in_tiles = self.adapter.weights.shape(self.a_key)[1]
        out_tiles = self.adapter.weights.shape(self.b_key)[0]
        return in_tiles * length * out_tiles * length

    def peft_delta(self, shape: Shape, ctx: EditContext) -> torch.Tensor:
        logits_a, logits_b, bank = ctx.load(self.a_key), ctx.load(self.b_key), ctx.load(self.bank_key)
        a = mix(logits_a, bank, self.topk).reshape(logits_a.shape[0], -1)
        b = mix(logits_b, bank, self.topk).transpose(1, 2).reshape(-1, logits_b.shape[1])
        delta = b @ a
        return (delta.T if self.fan_in_fan_out else delta).reshape(shape)


class Vblora(AdapterKind):
    peft_type = "VBLORA"
    param_roots = frozenset({"vblora_logits_A", "vblora_logits_B", BANK})

    def check_adapter(self, adapter: Adapter) -> None:
        if adapter.config.get("save_only_topk_weights") or BANK not in self.shared_params(adapter):
            raise UnsupportedAdapterError(
                "this VB-LoRA adapter was saved with save_only_topk_weights (or without its vector bank)",
                path=adapter.weights.path,
                fix="re-save it with save_only_topk_weights=False",
            )

    def module_edits(
        self, adapter: Adapter, module: AdapterModule, base_shape: Callable[[str], Shape | None]
    ) -> list[TensorEdit]:
        if not (module.has("vblora_logits_A") and module.has("vblora_logits_B")):
            raise missing_params(adapter, module.path, list(module.params), "vblora_logits_A and vblora_logits_B")
        bank = self.shared_params(adapter)[BANK]
        topk = int(config_number(adapter, "topk", 2))
        logits_a, logits_b = module.params["vblora_logits_A"], module.params["vblora_logits_B"]
        return [VbloraEdit(adapter, f"{module.path}.weight", logits_a, logits_b, bank, topk)]
