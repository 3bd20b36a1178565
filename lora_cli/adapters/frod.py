"""FRoD as PEFT defines it (`peft/tuners/frod/layer.py`): each layer's weight is re-expressed on a basis V shared by
the layers of one role (`q_proj` across blocks), W = U diag(lambda) V^T, and the trained lambda_l plus a sparse
off-diagonal S give the new weight U (S + diag(lambda_l)) V^T.

U is not saved: PEFT solves it from V and the base weight when loading (`_calculate_frod_u_and_lambda`, in float64:
bi = solve(V, W^T)^T, U = bi / |bi| per column), then holds it in the base dtype. The merge is PEFT's
`get_delta_weight`: U, V, S and lambda in the base dtype, U @ (S + L) @ V^T - W computed in it, added to W. V, S's
positions and its size are saved per role (`save_projection=True`, the default); without them PEFT derives V from all
the role's layers at once (a joint decomposition across tensors), which loractl refuses by name.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lora_cli.adapters.base import Adapter, AdapterKind, AdapterModule, EditContext, Shape, TensorEdit
from lora_cli.adapters.from_base import FromBaseEdit
from lora_cli.adapters.params import missing_params, require
from lora_cli.errors import InputError, UnsupportedAdapterError

SHARED = ("frod_V", "frod_s_indices", "frod_s_size")


def category_of(path: str) -> str:
    """PEFT's `_category_from_key`: the role a module plays, shared by its blocks."""
    parts = path.split(".")
    if len(parts) == 1:
        return parts[0]
    if parts[-2].isdigit():
        return parts[-1]
    category = f"{parts[-2]}_{parts[-1]}"
    if category == "output_dense" and len(parts) >= 3 and parts[-3] == "attention":
        return "attention_output"
    return category


def shared_keys(adapter: Adapter) -> dict[str, dict[str, str]]:
    """{category: {"frod_V": key, ...}}: saved once per role as `base_model.frod_V.<category>`."""
    found: dict[str, dict[str, str]] = {}
    for key in adapter.weights.keys():  # noqa: SIM118 - AdapterWeights is not a dict
        parts = key.split(".")
        for name in SHARED:
            if name in parts[:-1]:
                category = parts[parts.index(name) + 1]
                found.setdefault(category, {})[name] = key
    return found


class FrodEdit(FromBaseEdit):
    kind = "frod"
    rounds_change = True

    def __init__(self, adapter: Adapter, target: str, params: dict[str, str], shared: dict[str, str]) -> None:
        self.lambda_l, self.values = params["frod_lambda_l"], params["frod_lambda_s_values"]
        self.v_key, self.indices_key, self.size_key = (shared[name] for name in SHARED)
        self.fan_in_fan_out = bool(adapter.config.get("fan_in_fan_out"))
        keys = [self.lambda_l, self.values, self.v_key, self.indices_key, self.size_key]
        nnz = adapter.weights.shape(self.values)[0]
        super().__init__(adapter, target, keys, f"{nnz} sparse + {adapter.weights.shape(self.lambda_l)[0]} diagonal")

    def check(self, shape: Shape) -> str | None:
        v = self.adapter.weights.shape(self.v_key)
        lam = self.adapter.weights.shape(self.lambda_l)
        into = shape[0] if self.fan_in_fan_out else shape[-1]
        if len(shape) != 2 or v != (into, into) or lam != (into,):
            return f"{self.target}: FRoD V {v}, lambda_l {lam} vs base {tuple(shape)}"
        indices, size = self.adapter.weights.shape(self.indices_key), self.adapter.weights.shape(self.size_key)
        values = self.adapter.weights.shape(self.values)
        if len(indices) != 2 or indices[0] != 2 or (indices[1],) != values or size != (2,):
            return f"{self.target}: FRoD sparse indices {indices}, values {values}, size {size} do not fit together"
        return None

    def change(self, weight: torch.Tensor, ctx: EditContext) -> torch.Tensor:
        dtype = ctx.stored_dtype or weight.dtype
        base = (weight.T if self.fan_in_fan_out else weight).to(dtype)
        v_stored = ctx.load(self.v_key).to(dtype)
        w64, v64 = base.to(torch.float64), v_stored.to(torch.float64)
        try:
            bi = torch.linalg.solve(v64, w64.T).T
        except RuntimeError:
            bi = w64 @ torch.linalg.pinv(v64, rtol=1e-6).T
        norms = torch.linalg.norm(bi, dim=0)
        u = torch.zeros_like(bi)
        nonzero = norms > 1e-12
        u[:, nonzero] = bi[:, nonzero] / norms[nonzero]
        u = u.float().to(dtype)
        indices = ctx.load(self.indices_key).to(torch.long)
        size = tuple(int(dim) for dim in ctx.load(self.size_key).tolist())
        values = ctx.load(self.values).to(dtype)
        square = (v_stored.shape[0], v_stored.shape[0])
        if size != square:
            problem = f"FRoD sparse matrix of size {list(size)}, where the base needs {list(square)}"
        elif not bool(((indices >= 0) & (indices < torch.tensor(size)[:, None])).all()):
            problem = f"FRoD sparse indices outside its {list(size)} matrix"
        else:
            problem = None
        if problem is not None:
            fix = "the adapter file is corrupt; re-save it"
            raise InputError(f"{self.target}: {problem}", path=self.adapter.weights.path, fix=fix)
        s = torch.sparse_coo_tensor(indices, values, size, check_invariants=True).coalesce().to_dense()
        lam = torch.diag_embed(ctx.load(self.lambda_l).to(dtype))
        frod_weight = u @ (s + lam) @ v_stored.T
        delta = (frod_weight - base).to(weight.dtype)
        return delta.T if self.fan_in_fan_out else delta


class Frod(AdapterKind):
    peft_type = "FROD"
    param_roots = frozenset({"frod_lambda_l", "frod_lambda_s_values", *SHARED})

    def module_edits(
        self, adapter: Adapter, module: AdapterModule, base_shape: Callable[[str], Shape | None]
    ) -> list[TensorEdit]:
        require(adapter, module, "frod_lambda_l", "frod_lambda_s_values")
        category = category_of(module.path)
        shared = shared_keys(adapter).get(category, {})
        if not shared:
            raise UnsupportedAdapterError(
                "this FRoD adapter was saved without its projections (save_projection=False): PEFT derives them "
                "from all the layers of a role at once, which a tensor-at-a-time merge cannot",
                path=adapter.weights.path,
                fix="re-save it with save_projection=True (the default), or merge it with PEFT",
            )
        if set(shared) != set(SHARED):
            raise missing_params(adapter, f"base_model ({category})", list(shared), " and ".join(SHARED))
        return [FrodEdit(adapter, f"{module.path}.weight", module.params, shared)]
