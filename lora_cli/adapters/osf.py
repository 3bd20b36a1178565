"""OSF as PEFT defines it (`peft/tuners/osf/layer.py`): the weight's smaller singular directions, retrained.

PEFT splits the base weight by an SVD (fp32, `decompose_weight_matrix`) into its top-k part, frozen, and the rest,
trained and saved as U_low, S_low, V_low; the initial low part is recomputed from the base when loading.
delta = (U_low * S_low) @ V_low - (U0 * S0) @ V0, with U0, S0, V0 the base's own trailing singular triplets.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lora_cli.adapters.base import Adapter, AdapterKind, AdapterModule, EditContext, Shape, TensorEdit
from lora_cli.adapters.from_base import FromBaseEdit
from lora_cli.adapters.params import require

PARAMS = ("osf_svd_params.U_low", "osf_svd_params.S_low", "osf_svd_params.V_low")


class OsfEdit(FromBaseEdit):
    kind = "osf"

    def __init__(self, adapter: Adapter, target: str, keys: list[str]) -> None:
        self.u_key, self.s_key, self.v_key = keys
        self.low = adapter.weights.shape(self.s_key)[0]
        super().__init__(adapter, target, keys, f"{self.low} trained directions")

    def check(self, shape: Shape) -> str | None:
        u, v = self.adapter.weights.shape(self.u_key), self.adapter.weights.shape(self.v_key)
        if len(shape) != 2 or u != (shape[0], self.low) or v != (self.low, shape[1]) or self.low > min(shape):
            return f"{self.target}: OSF U {u}, V {v} vs base {tuple(shape)}"
        return None

    def change(self, weight: torch.Tensor, ctx: EditContext) -> torch.Tensor:
        u_init, s_init, vt_init = torch.linalg.svd(weight.to(torch.float32), full_matrices=False)
        top = s_init.shape[0] - self.low
        # PEFT rounds the initial triplets to the base dtype, then (its buffers upcast with the adapter) multiplies
        # them in fp32.
        dtype = ctx.stored_dtype or weight.dtype
        u0, s0, v0 = (
            part.contiguous().to(dtype).to(u_init.dtype) for part in (u_init[:, top:], s_init[top:], vt_init[top:, :])
        )
        u, s, v = ctx.load(self.u_key), ctx.load(self.s_key), ctx.load(self.v_key)
        current = torch.mm(u * s.unsqueeze(0), v)
        initial = torch.mm(u0 * s0.unsqueeze(0), v0)
        return current - initial


class Osf(AdapterKind):
    peft_type = "OSF"
    param_roots = frozenset({"osf_svd_params"})
    param_leaves = frozenset({"U_low", "S_low", "V_low"})

    def module_edits(
        self, adapter: Adapter, module: AdapterModule, base_shape: Callable[[str], Shape | None]
    ) -> list[TensorEdit]:
        return [OsfEdit(adapter, f"{module.path}.weight", require(adapter, module, *PARAMS))]
