"""LoRA as PEFT defines it (`peft/tuners/lora/layer.py`, `variants.py`): plain, rsLoRA, patterns,
fan_in_fan_out, embeddings, convolutions, DoRA and `lora_bias`.

Every delta is computed in PEFT's order, `transpose(B @ A, fan_in_fan_out) * scaling` in fp32, and added to the
base in fp32 with one rounding at the end: the exact bytes of PEFT's CPU `merge_and_unload`. Any other order
(addmm, scaling B first, fp64) lands tens of ulps away where the delta cancels the weight.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from lora_cli.adapters.additive import AdditiveEdit
from lora_cli.adapters.base import (
    Adapter,
    AdapterKind,
    AdapterModule,
    EditContext,
    EditForm,
    LowRank,
    RowDelta,
    Shape,
    TensorEdit,
)
from lora_cli.adapters.checks import lora_factor_problem
from lora_cli.adapters.param_lora import parameter_edits
from lora_cli.adapters.params import mismatched_rank, missing_params
from lora_cli.errors import InputError, NotRevertibleError


@dataclass(frozen=True)
class LoraFactors:
    """Which tensors hold A and B, and how they combine: linear, embedding (stored transposed) or conv."""

    a_key: str
    b_key: str
    layout: str  # "linear" | "embedding" | "conv"
    rank: int
    scaling: float
    fan_in_fan_out: bool


def lora_delta(factors: LoraFactors, ctx: EditContext, base_shape: Shape) -> torch.Tensor:
    """The module's delta in working precision, in exactly PEFT's order of operations.

    `(B @ A) * scaling` written into a reused buffer with an in-place multiply: the same products and the same
    single fp32 rounding per element as PEFT's expression, without allocating two weight-sized tensors.
    """
    a, b = ctx.load(factors.a_key), ctx.load(factors.b_key)
    if factors.layout in ("linear", "embedding"):
        product = torch.matmul(b, a, out=ctx.scratch("delta", (b.shape[0], a.shape[1])))
        product = product.mul_(factors.scaling)
        return product.T if factors.layout == "embedding" or factors.fan_in_fan_out else product
    if factors.layout == "conv":
        if tuple(base_shape[2:4]) == (1, 1):
            return (b.squeeze(3).squeeze(2) @ a.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3) * factors.scaling
        groups = a.shape[1] // base_shape[1]
        conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[len(base_shape)]
        delta = conv(a.transpose(0, 1), b)
        return delta * factors.scaling if groups > 1 else delta.transpose(0, 1) * factors.scaling
    raise ValueError(f"unknown LoRA layout {factors.layout!r}")


class LoraVariant(ABC):
    """A variant composed onto a LoRA edit (PEFT's `LoraVariant`, `peft/tuners/lora/variants.py`): it changes how the
    plain low-rank delta is merged into W and taken out again."""

    name: ClassVar[str]

    @abstractmethod
    def adapter_keys(self) -> list[str]: ...

    @abstractmethod
    def merge(self, edit: LoraEdit, weight: torch.Tensor, delta: torch.Tensor, ctx: EditContext) -> torch.Tensor:
        """W merged with the plain delta, as the variant's `merge_safe` computes it."""

    @abstractmethod
    def unmerge(
        self, edit: LoraEdit, merged: torch.Tensor, delta: torch.Tensor, ctx: EditContext, base: torch.Tensor | None
    ) -> torch.Tensor:
        """W back from the merged tensor; `base` is the original when the user gave one."""

    revert_needs_base: ClassVar[bool] = False


class DoraVariant(LoraVariant):
    """DoRA: m / ||W + delta|| * (W + delta), the norm taken over each output (or, for embeddings, input) unit."""

    name = "dora"
    revert_needs_base = True  # the merged tensor no longer holds ||W + delta||

    def __init__(self, magnitude_key: str) -> None:
        self.magnitude_key = magnitude_key

    def adapter_keys(self) -> list[str]:
        return [self.magnitude_key]

    def _factor(self, edit: LoraEdit, base: torch.Tensor, delta: torch.Tensor, ctx: EditContext) -> torch.Tensor:
        magnitude = ctx.load(self.magnitude_key)
        if edit.factors.layout == "conv":
            # `DoraConv2dLayer.get_weight_norm`: one norm per output channel.
            norm = (base + delta).norm(p=2, dim=tuple(range(1, base.dim())), keepdim=True).transpose(1, 0)
            return (magnitude / norm).view(-1, *([1] * (base.dim() - 1)))
        # `DoraLinearLayer.get_weight_norm`: transpose for Conv1D-style and embedding weights, then row norms.
        transposed = edit.factors.fan_in_fan_out or edit.factors.layout == "embedding"
        combined = (base + delta).T if transposed else base + delta
        norm = torch.linalg.norm(combined, dim=1).to(combined.dtype)
        factor = magnitude / norm
        return factor.view(1, -1) if transposed else factor.view(-1, 1)

    def merge(self, edit: LoraEdit, weight: torch.Tensor, delta: torch.Tensor, ctx: EditContext) -> torch.Tensor:
        return self._factor(edit, weight, delta, ctx) * (weight + delta)

    def unmerge(
        self, edit: LoraEdit, merged: torch.Tensor, delta: torch.Tensor, ctx: EditContext, base: torch.Tensor | None
    ) -> torch.Tensor:
        if base is None:
            raise NotRevertibleError(
                f"{edit.target} is a DoRA merge; undoing it needs the base weight's norms, which the merged "
                "checkpoint does not hold",
                path=edit.adapter.ref,
                fix="pass --base BASE",
            )
        return merged / self._factor(edit, base, delta, ctx) - delta


class LoraEdit(AdditiveEdit):
    """W + w * delta, where w is the user's `ADAPTER@w` multiplier (1 by default); with a variant (DoRA), the
    variant decides how the same delta is merged."""

    def __init__(self, adapter: Adapter, target: str, factors: LoraFactors, variant: LoraVariant | None = None) -> None:
        keys = [factors.a_key, factors.b_key, *(variant.adapter_keys() if variant else [])]
        super().__init__(
            adapter,
            target,
            keys,
            f"r={factors.rank} scale={factors.scaling:g}",
            rank=factors.rank,
            scale=factors.scaling,
        )
        self.factors = factors
        self.variant = variant
        self.kind = variant.name if variant else "lora"

    def expected_shape(self) -> Shape:
        a = self.adapter.weights.shape(self.factors.a_key)
        b = self.adapter.weights.shape(self.factors.b_key)
        if self.factors.layout == "embedding":
            return (a[1], b[0])
        if self.factors.layout == "conv":
            return (b[0], *a[1:])
        return (a[1], b[0]) if self.factors.fan_in_fan_out else (b[0], a[1])

    def low_rank(self) -> LowRank | None:
        factors = self.factors
        if factors.layout == "conv":
            return None
        transposed = factors.layout == "embedding" or factors.fan_in_fan_out
        scale = factors.scaling * self.adapter.weight
        return LowRank(factors.a_key, factors.b_key, factors.rank, scale, transposed)

    def row_blocks(self) -> bool:
        # A block of B's rows times A gives those rows of B @ A with the same sums, in the same order (the BLAS
        # splits M and N, never the rank, across its kernels); tests/test_row_blocks.py pins it. The transposed
        # layouts would need column blocks, and a variant rescales the whole: both take the whole delta.
        factors = self.factors
        return self.variant is None and factors.layout == "linear" and not factors.fan_in_fan_out

    def row_delta(self, shape: Shape, ctx: EditContext) -> RowDelta:
        if not self.row_blocks():
            return super().row_delta(shape, ctx)
        a, b = ctx.load(self.factors.a_key), ctx.load(self.factors.b_key)
        scaling, weight = self.factors.scaling, self.adapter.weight

        def rows(start: int, stop: int, into: torch.Tensor) -> torch.Tensor:
            # `lora_delta`'s operations on a block of rows: (B @ A) * scaling, then ADAPTER@w, each rounded once.
            delta = torch.matmul(b[start:stop], a, out=into).mul_(scaling)
            return delta if weight == 1.0 else delta.mul_(weight)

        return rows

    @property
    def form(self) -> EditForm:
        form = super().form
        if self.variant is None:
            return form
        return dataclasses.replace(form, kind="transform", revert_needs_base=self.variant.revert_needs_base)

    def check(self, shape: Shape) -> str | None:
        expected = self.expected_shape()
        if self.factors.layout == "conv":
            fits = len(shape) == len(expected) and shape[0] == expected[0] and shape[2:] == expected[2:]
            if fits and expected[1] != shape[1] and expected[1] % max(shape[1], 1) == 0:
                # PEFT refuses this merge too: its delta does not have the grouped kernel's shape.
                groups = expected[1] // shape[1]
                return f"{self.target}: a LoRA on a grouped convolution (groups={groups}) cannot be merged"
            fits = fits and expected[1] == shape[1]
        else:
            fits = tuple(shape) == expected
        return None if fits else f"{self.target}: delta {expected} vs base {tuple(shape)}"

    def peft_delta(self, shape: Shape, ctx: EditContext) -> torch.Tensor:
        return lora_delta(self.factors, ctx, shape)

    def delta(self, shape: Shape, ctx: EditContext) -> torch.Tensor:
        delta = self.peft_delta(shape, ctx)
        # In place: `lora_delta` gives a fresh (or scratch) tensor of this edit's own.
        return delta if self.adapter.weight == 1.0 else delta.mul_(self.adapter.weight)

    def apply(self, weight: torch.Tensor, ctx: EditContext) -> torch.Tensor:
        if self.variant is None:
            return super().apply(weight, ctx)
        return self.variant.merge(self, weight, self.delta(tuple(weight.shape), ctx), ctx)

    def revert(self, merged: torch.Tensor, ctx: EditContext, base: torch.Tensor | None = None) -> torch.Tensor:
        if self.variant is None:
            return super().revert(merged, ctx, base)
        delta = self.delta(tuple(merged.shape), ctx)
        return self.variant.unmerge(self, merged, delta, ctx, base)


class LoraBiasEdit(AdditiveEdit):
    """`lora_bias=True`: the bias gains lora_B's bias times the scaling."""

    kind = "lora_bias"

    def __init__(self, adapter: Adapter, target: str, key: str, scaling: float) -> None:
        super().__init__(adapter, target, [key], scale=scaling)
        self.key = key

    def expected_shape(self) -> Shape:
        return tuple(self.adapter.weights.shape(self.key))

    def check(self, shape: Shape) -> str | None:
        own = self.expected_shape()
        return None if own == tuple(shape) else f"{self.target}: lora bias {own} vs base {tuple(shape)}"

    def peft_delta(self, shape: Shape, ctx: EditContext) -> torch.Tensor:
        return ctx.load(self.key) * self.scale


def lora_scaling(adapter: Adapter, module_path: str, rank: int) -> float:
    """PEFT's `scaling`: alpha / r, or alpha / sqrt(r) with rsLoRA; r and alpha may come from the patterns."""
    config = adapter.config
    config_path = adapter.config_path
    pattern_rank = adapter.pattern_value("rank_pattern", module_path, config.get("r", 8))
    alpha = adapter.pattern_value("alpha_pattern", module_path, config.get("lora_alpha", 8))
    if not isinstance(pattern_rank, int) or isinstance(pattern_rank, bool) or pattern_rank <= 0:
        raise InputError(
            f"r must be a positive integer, got {pattern_rank!r}",
            path=config_path,
            fix="set it in adapter_config.json to the value the adapter was trained with, or re-save the adapter",
        )
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha < 0:
        raise InputError(
            f"lora_alpha must be a non-negative number, got {alpha!r}",
            path=config_path,
            fix="set it in adapter_config.json to the value the adapter was trained with, or re-save the adapter",
        )
    if pattern_rank != rank:
        raise mismatched_rank(adapter, module_path, pattern_rank, "lora_A", rank)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _factors(adapter: Adapter, module: AdapterModule) -> tuple[LoraFactors, str] | None:
    params = module.params
    if "lora_embedding_A" in params and "lora_embedding_B" in params:
        a_key, b_key, layout = params["lora_embedding_A"], params["lora_embedding_B"], "embedding"
    elif "lora_A.weight" in params and "lora_B.weight" in params:
        a_key, b_key = params["lora_A.weight"], params["lora_B.weight"]
        layout = "conv" if len(adapter.weights.shape(a_key)) > 2 else "linear"
    else:
        return None
    problem = lora_factor_problem(adapter.weights.shape(a_key), adapter.weights.shape(b_key), layout)
    if problem is not None:
        raise InputError(f"{module.path}: {problem}", path=adapter.weights.path, fix="re-save the adapter with PEFT")
    rank = adapter.weights.shape(a_key)[0]
    factors = LoraFactors(
        a_key=a_key,
        b_key=b_key,
        layout=layout,
        rank=rank,
        scaling=lora_scaling(adapter, module.path, rank),
        fan_in_fan_out=bool(adapter.config.get("fan_in_fan_out")) and layout == "linear",
    )
    return factors, f"{module.path}.weight"


class Lora(AdapterKind):
    peft_type = "LORA"
    param_roots = frozenset({"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"})

    def module_edits(
        self, adapter: Adapter, module: AdapterModule, base_shape: Callable[[str], Shape | None]
    ) -> list[TensorEdit]:
        on_parameter = parameter_edits(adapter, module)
        if on_parameter is not None:
            return on_parameter  # target_parameters: an MoE expert stack or a router weight
        found = _factors(adapter, module)
        if found is None:
            raise missing_params(adapter, module.path, list(module.params), "both LoRA factors")
        factors, target = found
        magnitude = module.params.get("lora_magnitude_vector") or module.params.get("lora_magnitude_vector.weight")
        variant = DoraVariant(magnitude) if magnitude is not None else None
        edits: list[TensorEdit] = [LoraEdit(adapter, target, factors, variant)]
        if "lora_B.bias" in module.params:
            edits.append(LoraBiasEdit(adapter, f"{module.path}.bias", module.params["lora_B.bias"], factors.scaling))
        return edits
