"""PSOFT as PEFT defines it (`peft/tuners/psoft/layer.py`): an r x r orthogonal transform R, with magnitude vectors,
inserted between the top-r singular factors of the base weight.

PEFT recomputes the factors from the base when loading (`_build_psoft_ab_cache_buffers`): an fp32 SVD of W (full,
or `svd_lowrank` seeded with `random_seed`), A = Vh_r and B = U_r diag(S_r / scaling) (PiSSA-style: sqrt split).
R is the Cayley transform of skew(weight) (exact solve or truncated Neumann series), scaled by vector_b on the left
and vector_a on the right. delta = transpose(B @ (R - I) @ A, fan_in_fan_out) * psoft_alpha / r, in fp32, rounded
to the base dtype before it is added.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lora_cli.adapters.base import Adapter, AdapterKind, AdapterModule, EditContext, Shape, TensorEdit
from lora_cli.adapters.from_base import FromBaseEdit
from lora_cli.adapters.params import config_number, require
from lora_cli.errors import InputError


def orthogonal(q_vec: torch.Tensor, size: int, config: dict) -> torch.Tensor:
    """PEFT's `OrthLayer.get_matrix` without the magnitude vectors."""
    rows, cols = torch.triu_indices(size, size, 1, device=q_vec.device)
    q = torch.zeros((size, size), device=q_vec.device, dtype=q_vec.dtype).index_put((rows, cols), q_vec)
    q = q - q.transpose(0, 1)
    eye = torch.eye(size, device=q.device, dtype=q.dtype)
    if not config.get("use_cayley_neumann"):
        return torch.linalg.solve(eye - q, eye + q, left=False)
    eps = config.get("cayley_neumann_eps")
    if eps is not None:
        norm = torch.linalg.norm(q, ord="fro")
        if torch.isfinite(norm) and norm > eps:
            q = q * (eps / (norm + 1e-12))
    terms = int(config.get("num_cayley_neumann_terms", 5))
    r = eye.clone()
    if terms > 1:
        r.add_(q, alpha=2.0)
        if terms > 2:
            q_squared = q @ q
            r.add_(q_squared, alpha=2.0)
            q_power = q_squared
            for _ in range(3, terms - 1):
                q_power = q_power @ q
                r.add_(q_power, alpha=2.0)
            q_power = q_power @ q
            r.add_(q_power)
    return r


class PsoftEdit(FromBaseEdit):
    kind = "psoft"
    rounds_change = True

    def __init__(self, adapter: Adapter, target: str, params: dict[str, str], rank: int) -> None:
        config = adapter.config
        self.rank = rank
        self.scaling = config_number(adapter, "psoft_alpha", 32) / rank
        self.weight_key = params["psoft_R.weight"]
        self.vector_a = params.get("psoft_R.vector_a") if config.get("psoft_mag_a", True) else None
        self.vector_b = params.get("psoft_R.vector_b") if config.get("psoft_mag_b", True) else None
        self.orth = bool(config.get("psoft_orth", True))
        self.fan_in_fan_out = bool(config.get("fan_in_fan_out"))
        keys = [k for k in (self.weight_key, self.vector_a, self.vector_b) if k]
        super().__init__(adapter, target, keys, f"r={rank} scale={self.scaling:g}")

    def check(self, shape: Shape) -> str | None:
        stored = self.adapter.weights.shape(self.weight_key)
        expected = (self.rank * (self.rank - 1) // 2,) if self.orth else (self.rank, self.rank)
        if len(shape) != 2 or stored != expected or self.rank > min(shape):
            return f"{self.target}: PSOFT R {stored} (r={self.rank}) vs base {tuple(shape)}"
        return None

    def _factors(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        config, r = self.adapter.config, self.rank
        if config.get("psoft_svd", "full") == "full":
            u, s, vh = torch.linalg.svd(w.data, full_matrices=False)
            vr, sr, uhr = u[:, :r], s[:r], vh[:r, :]
        else:
            fork = {"devices": []} if w.device.type == "cpu" else {"devices": [w.device], "device_type": w.device.type}
            with torch.random.fork_rng(**fork):
                torch.manual_seed(int(config.get("random_seed", 0)))
                u, s, v = torch.svd_lowrank(w.data, q=r, niter=int(config.get("psoft_svd_lowrank_niter", 10)))
            vr, sr, uhr = u[:, :r], s[:r], v[:, :r].t()
        sr_scaled = sr / self.scaling
        if config.get("ab_svd_init", "psoft_init") == "psoft_init":
            return uhr.contiguous(), (vr @ torch.diag(sr_scaled)).contiguous()
        s_sqrt = torch.sqrt(sr_scaled)
        return (torch.diag(s_sqrt) @ uhr).contiguous(), (vr @ torch.diag(s_sqrt)).contiguous()

    def change(self, weight: torch.Tensor, ctx: EditContext) -> torch.Tensor:
        w = weight.to(torch.float32)
        a, b = self._factors(w.T if self.fan_in_fan_out else w)
        q = ctx.load(self.weight_key)
        r = orthogonal(q, self.rank, self.adapter.config) if self.orth else q
        if self.vector_b:
            r = ctx.load(self.vector_b)[:, None] * r
        if self.vector_a:
            r = r * ctx.load(self.vector_a)[None, :]
        eye = torch.eye(self.rank, device=w.device, dtype=torch.float32)
        delta = b @ (r.to(torch.float32) - eye) @ a
        return (delta.T if self.fan_in_fan_out else delta) * self.scaling


class Psoft(AdapterKind):
    peft_type = "PSOFT"
    param_roots = frozenset({"psoft_R"})
    param_leaves = frozenset({"vector_a", "vector_b"})

    def check_adapter(self, adapter: Adapter) -> None:
        config = adapter.config
        for key, allowed in (("ab_svd_init", ("psoft_init", "pissa_init")), ("psoft_svd", ("full", "lowrank"))):
            if config.get(key, allowed[0]) not in allowed:
                raise InputError(
                    f"{key} {config.get(key)!r} is not one of {', '.join(allowed)}",
                    path=adapter.config_path,
                )

    def module_edits(
        self, adapter: Adapter, module: AdapterModule, base_shape: Callable[[str], Shape | None]
    ) -> list[TensorEdit]:
        config = adapter.config
        rank = int(config_number(adapter, "r", 32))
        names = ["psoft_R.weight"]
        names += [f"psoft_R.vector_{side}" for side in ("a", "b") if config.get(f"psoft_mag_{side}", True)]
        require(adapter, module, *names)
        return [PsoftEdit(adapter, f"{module.path}.weight", module.params, rank)]
