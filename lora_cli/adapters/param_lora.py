"""LoRA on parameters (`target_parameters`, PEFT's `ParamWrapper`): MoE expert stacks and routers.

PEFT (`peft/tuners/lora/layer.py`, `ParamWrapper`) adapts a bare `nn.Parameter`. For a 3-D expert stack
[E, a, b] it keeps `lora_A` as [E*r, in] grouped by expert and `lora_B` as [out, r*E] with the expert index
varying fastest, and its delta is `einsum("o r e, e r i -> e o i", B, A) * scaling` (or `e i o` when the stack
runs as [E, in, out], transformers' `is_transposed`), cast to the parameter's dtype before it is added. A 2-D
parameter (a router's `gate.weight`) takes lora.Linear's delta, cast the same way. Several parameters of one
module nest their wrappers: the first the module registers is innermost, so its factors are saved under
`base_layer.` once per later parameter.

Each expert's delta is computed on its own (the same einsum on one expert's factors) and laid on the tensors
the checkpoint stores for it, through `lora_cli.naming` (per expert, fused or transposed).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from lora_cli.adapters.base import Adapter, AdapterModule, EditContext, EditForm, Shape, TensorEdit
from lora_cli.errors import AdapterMismatchError, InputError
from lora_cli.io.dtypes import SAFETENSORS_TO_TORCH
from lora_cli.io.safetensors_file import TensorInfo
from lora_cli.naming import NameMap, RuntimeParamEdit, StoredPiece
from lora_cli.patterns import full_match

BASE_LAYER = ".base_layer"


def parameter_module(adapter: Adapter, module_path: str) -> tuple[str, int, list[str]] | None:
    """For a module of a `target_parameters` adapter: its run-time module, nesting depth and candidate parameters."""
    targets = adapter.config.get("target_parameters") or []
    if not targets:
        return None
    owner, depth = module_path, 0
    while owner.endswith(BASE_LAYER):
        owner, depth = owner[: -len(BASE_LAYER)], depth + 1
    if depth == 0 and _is_target_module(adapter.config.get("target_modules"), owner):
        return None
    candidates: list[str] = []
    for entry in targets:
        module_part, _, param = str(entry).rpartition(".")
        matches = not module_part or owner == module_part or owner.endswith("." + module_part)
        if matches and param not in candidates:
            candidates.append(param)
    if not candidates:
        return None
    # PEFT wraps a module's parameters in its registration order; a module with more than one may list more
    # candidates than it has (a suffix like `gate.weight` matches many modules): `bind` settles it.
    return owner, depth, candidates


class ParamLoraEdit(RuntimeParamEdit):
    """A `ParamWrapper` LoRA on one run-time parameter: W + round_dtype(delta), expert by expert."""

    kind = "lora"

    def __init__(self, adapter: Adapter, owner: str, depth: int, candidates: list[str], a_key: str, b_key: str) -> None:
        super().__init__(adapter, f"{owner}.{candidates[0]}")
        self.owner, self.depth, self.candidates = owner, depth, candidates
        self.a_key, self.b_key = a_key, b_key
        self.param = candidates[0]
        self.rank = 0
        self.num_experts = 1
        self.scaling = 1.0
        self.swapped = True  # delta laid out [E, out, in] (PEFT's `_did_swap_in_out_features`)
        self.dtype = torch.float32
        self.shape: Shape = ()
        self.bound = False

    # -- settling the parameter ------------------------------------------------------------------------------------

    def bind(self, names: NameMap, stored_as: Callable[[str], TensorInfo | None]) -> None:
        in_features = self.adapter.weights.shape(self.a_key)[1]
        out_features = self.adapter.weights.shape(self.b_key)[0]
        self.param = self._which_param(names)
        self.target = f"{self.owner}.{self.param}"
        self.bound = True
        stored = stored_as(self.target)
        shape = tuple(stored.shape) if stored is not None else self._runtime_shape(names)
        self.shape = shape
        self.dtype = SAFETENSORS_TO_TORCH[stored.dtype] if stored is not None else self.dtype
        rows = self.adapter.weights.shape(self.a_key)[0]
        self.num_experts = shape[0] if len(shape) == 3 else 1
        if rows % self.num_experts:
            raise self._misfit(f"lora_A has {rows} rows, not a multiple of the {self.num_experts} experts")
        self.rank = rows // self.num_experts
        self.scaling = _scaling(self.adapter, f"{self.owner}.{self.param}", self.rank)
        if len(shape) == 3:
            # PEFT swaps in and out unless the module runs its experts as [E, in, out]; a square stack needs the flag.
            if shape[1:] == (out_features, in_features) and shape[1:] != (in_features, out_features):
                self.swapped = True
            elif shape[1:] == (in_features, out_features) and shape[1:] != (out_features, in_features):
                self.swapped = False
            else:
                self.swapped = not names.is_transposed(self.owner) if names.usable else True

    def _which_param(self, names: NameMap) -> str:
        order = names.registration_order(self.owner) if names.usable else []
        targeted = [p for p in order if p in self.candidates] if order else []
        if targeted:
            if self.depth >= len(targeted):
                raise self._misfit(f"{self.owner} nests {self.depth + 1} parameter wrappers but has {len(targeted)}")
            return targeted[len(targeted) - 1 - self.depth]
        if len(self.candidates) == 1 and self.depth == 0:
            return self.candidates[0]
        raise names.unknown(f"which of {self.candidates} of {self.owner} each LoRA of the adapter adapts")

    def _runtime_shape(self, names: NameMap) -> Shape:
        shape = names.runtime_shapes.get(self.target) if names.usable else None
        if shape is None:
            raise self._misfit("the base has no such parameter")
        return shape

    def _misfit(self, why: str) -> AdapterMismatchError:
        return AdapterMismatchError(
            f"{self.target}: {why}", path=self.adapter.ref, fix="pass the base this adapter was trained on"
        )

    # -- the delta ------------------------------------------------------------------------------------------------

    def expert_delta(self, expert: int | None, ctx: EditContext, dtype: torch.dtype | None = None) -> torch.Tensor:
        """PEFT's delta for one expert ([a, b] of the run-time [E, a, b]) or, with None, for the whole parameter.

        Computed with PEFT's own einsum in fp32 and rounded to the parameter's dtype, as `get_delta_weight` does;
        the user's `ADAPTER@w` scales it before that rounding.
        """
        a, b = ctx.load(self.a_key), ctx.load(self.b_key)
        if len(self.shape) != 3:
            delta = (b @ a) * self.scaling  # lora.Linear.get_delta_weight (fan_in_fan_out is refused by PEFT)
        else:
            a = a.reshape(self.num_experts, -1, a.shape[-1])
            b = b.reshape(b.shape[0], -1, self.num_experts)
            if expert is not None:
                a, b = a[expert : expert + 1], b[:, :, expert : expert + 1]
            equation = "o r e, e r i -> e o i" if self.swapped else "o r e, e r i -> e i o"
            delta = torch.einsum(equation, b, a) * self.scaling
            if expert is not None:
                delta = delta[0]
        if self.adapter.weight != 1.0:
            delta = delta * self.adapter.weight
        return delta.to(dtype or self.dtype).to(ctx.work_dtype)

    def expected_shape(self) -> Shape:
        in_features = self.adapter.weights.shape(self.a_key)[1]
        out_features = self.adapter.weights.shape(self.b_key)[0]
        inner = (out_features, in_features) if self.swapped or len(self.shape) == 2 else (in_features, out_features)
        return (self.num_experts, *inner) if len(self.shape) == 3 else inner

    def check(self, shape: Shape) -> str | None:
        expected = self.expected_shape()
        return None if tuple(shape) == expected else f"{self.target}: delta {expected} vs base {tuple(shape)}"

    def adapter_keys(self) -> list[str]:
        return [self.a_key, self.b_key]

    @property
    def form(self) -> EditForm:
        # Additive, but not one product of two adapter tensors: E of them, each rounded as PEFT rounds it.
        return EditForm(
            "additive",
            shape=self.expected_shape() if self.bound else None,
            rank=self.rank or None,
            scale=self.scaling * self.adapter.weight if self.rank else None,
        )

    def delta(self, shape: Shape, ctx: EditContext) -> torch.Tensor:
        return self.expert_delta(None, ctx)

    def apply(self, weight: torch.Tensor, ctx: EditContext) -> torch.Tensor:
        return weight.add_(self.expert_delta(None, ctx))

    def revert(self, merged: torch.Tensor, ctx: EditContext, base: torch.Tensor | None = None) -> torch.Tensor:
        return merged.sub_(self.expert_delta(None, ctx))

    def describe(self) -> str:
        experts = f" x {self.num_experts} experts" if self.num_experts > 1 else ""
        return f"lora r={self.rank}{experts} scale={self.scaling:g} (parameter {self.param})"

    def piece_edit(self, piece: StoredPiece, stored: TensorInfo) -> TensorEdit:
        return ExpertPieceEdit(self, piece, stored)

    @property
    def label(self) -> str:
        """The parameter's name; without a base, which one of several is not known: the module as PEFT saved it."""
        if self.bound or len(self.candidates) == 1:
            return self.target
        return f"{self.owner}{BASE_LAYER * self.depth} ({' or '.join(self.candidates)})"

    def expert_factors(self, ctx: EditContext) -> list[tuple[int | None, torch.Tensor, torch.Tensor, float]]:
        """(expert, L, R, s) with expert e's delta s * L @ R, up to a transpose; unbound (no base), the rank is the
        config's and the parameter the first candidate."""
        if not self.rank:
            rows = self.adapter.weights.shape(self.a_key)[0]
            pattern_path = f"{self.owner}.{self.param}"
            rank = self.adapter.pattern_value("rank_pattern", pattern_path, self.adapter.config.get("r", 8))
            if not isinstance(rank, int) or rank <= 0 or rows % rank:
                return []
            self.rank, self.num_experts = rank, rows // rank
            self.scaling = _scaling(self.adapter, pattern_path, rank)
        a, b = ctx.load(self.a_key), ctx.load(self.b_key)
        scale = self.scaling * self.adapter.weight
        if self.num_experts == 1:
            return [(None, b, a, scale)]
        a = a.reshape(self.num_experts, -1, a.shape[-1])
        b = b.reshape(b.shape[0], -1, self.num_experts)
        return [(e, b[:, :, e], a[e], scale) for e in range(self.num_experts)]


class ExpertPieceEdit(TensorEdit):
    """The part of a `ParamLoraEdit` that one stored tensor holds (one expert's gate, up or down, say)."""

    kind = "lora"

    def __init__(self, whole: ParamLoraEdit, piece: StoredPiece, stored: TensorInfo) -> None:
        super().__init__(whole.adapter, piece.stored)
        self.whole, self.piece = whole, piece
        self.stored_shape = tuple(stored.shape)
        # PEFT rounds the delta to the parameter's dtype: the dtype the checkpoint stores it in.
        self.dtype = SAFETENSORS_TO_TORCH[stored.dtype]

    @property
    def expert(self) -> int | None:
        return self.piece.expert if self.whole.num_experts > 1 else None

    @property
    def rank(self) -> int:
        return self.whole.rank

    @property
    def scaling(self) -> float:
        return self.whole.scaling

    def piece_delta(self, ctx: EditContext) -> torch.Tensor:
        """This tensor's part of the parameter's delta, laid out as stored (one expert's only, when it holds one)."""
        expert = self.expert
        if expert is None:
            return self.piece.take(self.whole.expert_delta(None, ctx, self.dtype))
        return self.piece.take(self.whole.expert_delta(expert, ctx, self.dtype), from_axis=1)

    def check(self, shape: Shape) -> str | None:
        problem = self.whole.check(self.whole.shape)
        if problem:
            return problem
        return None if tuple(shape) == self.stored_shape else f"{self.target}: piece {self.stored_shape} vs {shape}"

    def adapter_keys(self) -> list[str]:
        return self.whole.adapter_keys()

    @property
    def form(self) -> EditForm:
        return EditForm("additive", shape=self.stored_shape, rank=self.rank, scale=self.scaling * self.adapter.weight)

    def delta(self, shape: Shape, ctx: EditContext) -> torch.Tensor:
        return self.piece_delta(ctx)

    def apply(self, weight: torch.Tensor, ctx: EditContext) -> torch.Tensor:
        return weight.add_(self.piece_delta(ctx))

    def revert(self, merged: torch.Tensor, ctx: EditContext, base: torch.Tensor | None = None) -> torch.Tensor:
        return merged.sub_(self.piece_delta(ctx))

    def describe(self) -> str:
        where = f" expert {self.expert}" if self.expert is not None else ""
        return f"lora r={self.whole.rank} scale={self.whole.scaling:g} ({self.whole.target}{where})"


def _is_target_module(target_modules: object, path: str) -> bool:
    """PEFT's `target_modules` rule: a regex matched in full (by the bounded engine, `patterns.py`), or names
    matched as the path's last segments."""
    if isinstance(target_modules, str):
        return full_match(target_modules, path, key="target_modules")
    if isinstance(target_modules, list):
        return any(path == str(t) or path.endswith("." + str(t)) for t in target_modules)
    return False


def _scaling(adapter: Adapter, pattern_path: str, rank: int) -> float:
    """alpha / r (or / sqrt(r) with rsLoRA), r and alpha looked up as PEFT does for `module.param`."""
    config_path = adapter.directory / "adapter_config.json"
    pattern_rank = adapter.pattern_value("rank_pattern", pattern_path, adapter.config.get("r", 8))
    alpha = adapter.pattern_value("alpha_pattern", pattern_path, adapter.config.get("lora_alpha", 8))
    if pattern_rank != rank:
        raise InputError(
            f"{pattern_path}: config gives r={pattern_rank} but its lora_A has rank {rank} per expert",
            path=config_path,
            fix="the config and the weights do not belong together; re-save the adapter",
        )
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha < 0:
        raise InputError(f"lora_alpha must be a non-negative number, got {alpha!r}", path=config_path)
    return alpha / math.sqrt(rank) if adapter.config.get("use_rslora") else alpha / rank


def parameter_edits(adapter: Adapter, module: AdapterModule) -> list[TensorEdit] | None:
    """The edit for a `target_parameters` module, or None when the module is an ordinary `target_modules` one."""
    found = parameter_module(adapter, module.path)
    if found is None or not (module.has("lora_A.weight") and module.has("lora_B.weight")):
        return None
    owner, depth, candidates = found
    return [
        ParamLoraEdit(adapter, owner, depth, candidates, module.params["lora_A.weight"], module.params["lora_B.weight"])
    ]
