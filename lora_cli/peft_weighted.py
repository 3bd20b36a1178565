"""`--peft-compatible`: PEFT's `LoraModel.add_weighted_adapter`, followed exactly, without loading a model.

A port of `peft/tuners/lora/model.py` (add_weighted_adapter, _check_add_weighted_adapter,
_generalized_task_arithmetic_weighted_adapter, _svd_generalized_task_arithmetic_weighted_adapter) and
`peft/utils/merge_utils.py`, operation for operation, so that the deterministic methods give PEFT's tensors. PEFT's
own rules hold, quirks included:

- the non-SVD methods (linear, ties, dare_*, magnitude_prune) combine the A and the B factors separately, with
  weights sqrt(|w * scale|) (the sign on A), and need equal ranks; cat stacks the factors (rank: the sum of the
  configs' ranks, zero rows where an adapter leaves a module alone); the *_svd methods combine the deltas and
  truncate by SVD to --rank (default: the largest input rank);
- TIES elects signs on the unweighted tensors and divides by the count of agreeing entries (not their weights);
  magnitude pruning keeps int(density * numel) entries (possibly none); DARE rescales by 1 / density;
- one adapter switches to linear; the new adapter copies adapter 0's config with r = lora_alpha = the new rank and
  no patterns (a use_rslora flag carries over, so the scale becomes sqrt(r), as in PEFT).

PEFT's DARE draws from torch's global generator in the model's module order, which an adapter file does not give:
here each mask comes from the seeded generator of lora_cli.combine (seed, adapter position, tensor name), so only
the distribution matches PEFT's.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_cli.adapter_writer import AdapterWriter
from lora_cli.adapters.base import Adapter, EditContext
from lora_cli.adapters.loading import load_adapter
from lora_cli.adapters.registry import kind_for
from lora_cli.combine import dare_generator
from lora_cli.errors import InputError, UnsupportedAdapterError
from lora_cli.io.atomic import atomic_directory, check_output
from lora_cli.module_deltas import ModuleDelta, module_deltas

PEFT_TYPES = (
    "svd",
    "linear",
    "cat",
    "ties",
    "ties_svd",
    "dare_ties",
    "dare_linear",
    "dare_ties_svd",
    "dare_linear_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)
FACTORWISE = ("linear", "ties", "dare_ties", "dare_linear", "magnitude_prune")
NEEDS_DENSITY = ("ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd")
NEEDS_DENSITY += ("magnitude_prune", "magnitude_prune_svd")


@dataclass(frozen=True)
class PeftCombine:
    combination_type: str
    svd_rank: int | None = None
    density: float | None = None
    majority_sign: str = "total"
    seed: int = 0


@dataclass
class PeftModuleResult:
    module: str
    a: torch.Tensor
    b: torch.Tensor
    embedding: bool
    energy_kept: float | None


# ---- peft/utils/merge_utils.py, with a generator for the random pruning --------------------------------------


def _reshape_weights(task_tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return weights.view(weights.shape + (1,) * (task_tensors.dim() - weights.dim()))


def _prune(tensor: torch.Tensor, density: float, method: str, generator: torch.Generator | None = None) -> torch.Tensor:
    if density >= 1:
        return tensor
    if method == "magnitude":
        mask = torch.zeros_like(tensor).reshape(-1)
        top_k = torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True)
        mask[top_k[1]] = 1
        return tensor * mask.reshape(tensor.shape)
    mask = torch.bernoulli(torch.full_like(input=tensor, fill_value=density), generator=generator)
    return tensor * mask / density


def _majority_mask(tensor: torch.Tensor, method: str) -> torch.Tensor:
    sign = tensor.sign()
    magnitude = tensor.sum(dim=0) if method == "total" else sign.sum(dim=0)
    return sign == torch.where(magnitude >= 0, 1, -1)


def _weighted_sum(task_tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    stacked = torch.stack(task_tensors, dim=0)
    return (stacked * _reshape_weights(stacked, weights)).sum(dim=0)


def _disjoint(task_tensors: list[torch.Tensor], weights: torch.Tensor, majority: str) -> torch.Tensor:
    stacked = torch.stack(task_tensors, dim=0)
    mask = _majority_mask(stacked, majority)
    weighted = stacked * _reshape_weights(stacked, weights)
    return (weighted * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


def peft_method(
    kind: str,
    tensors: list[torch.Tensor],
    weights: torch.Tensor,
    density: float | None,
    majority: str,
    generators: list[torch.Generator] | None = None,
) -> torch.Tensor:
    """merge_utils' task_arithmetic / ties / dare_linear / dare_ties / magnitude_prune (kind without "_svd")."""
    if kind in ("linear", "svd"):
        return _weighted_sum(tensors, weights)
    assert density is not None
    if kind == "magnitude_prune":
        return _weighted_sum([_prune(t, density, "magnitude") for t in tensors], weights)
    if kind == "ties":
        return _disjoint([_prune(t, density, "magnitude") for t in tensors], weights, majority)
    assert generators is not None
    pruned = [_prune(t, density, "random", g) for t, g in zip(tensors, generators, strict=True)]
    return _weighted_sum(pruned, weights) if kind == "dare_linear" else _disjoint(pruned, weights, majority)


# ---- peft/tuners/lora/model.py ----------------------------------------------------------------------------------


def _config_rank(adapter: Adapter) -> int:
    config = adapter.config
    pattern = config.get("rank_pattern") or {}
    return max(int(config.get("r", 8)), *pattern.values()) if pattern else int(config.get("r", 8))


def check_peft(adapters: list[Adapter], options: PeftCombine) -> tuple[str, int, object]:
    """_check_add_weighted_adapter: (combination type, new rank, new target_modules), or PEFT's refusal."""
    if options.combination_type not in PEFT_TYPES:
        raise InputError(
            f"combination type {options.combination_type!r} is not one of PEFT's: {', '.join(PEFT_TYPES)}",
            fix="name one with --method (combine) or --combine (merge)",
        )
    for adapter in adapters:
        if adapter.config.get("target_parameters"):
            raise UnsupportedAdapterError(
                "targets nn.Parameter: PEFT's add_weighted_adapter does not support it", path=adapter.directory
            )
        if adapter.full_tensors or adapter.token_rows:
            raise UnsupportedAdapterError(
                "carries modules_to_save or trainable tokens: PEFT gives the new adapter fresh copies of the base's "
                "modules, which needs the base model",
                path=adapter.directory,
                fix="drop --peft-compatible, or combine adapters without modules_to_save",
            )
    kind = "linear" if len(adapters) == 1 else options.combination_type
    ranks = [_config_rank(adapter) for adapter in adapters]
    if kind in FACTORWISE:
        if len(set(ranks)) != 1:
            raise InputError(
                "All adapters must have the same r value when using combination_type linear, ties, dare_ties or "
                f"dare_linear (PEFT's rule; ranks {ranks})",
                fix="use cat or an *_svd method, or loractl resize the adapters to one rank first",
            )
        if any(adapter.config.get("rank_pattern") for adapter in adapters):
            raise UnsupportedAdapterError(
                f"{kind} with rank_pattern adapters gives PEFT factors of other shapes than its config says",
                fix="use an *_svd method or cat",
            )
        new_rank = ranks[0]
    elif kind == "cat":
        new_rank = sum(ranks)
    else:
        new_rank = options.svd_rank or max(ranks)
    if kind in NEEDS_DENSITY and options.density is None:
        raise InputError(f"PEFT's {kind} needs a density", fix="pass --density, e.g. --density 0.5")
    targets = [adapter.config.get("target_modules") for adapter in adapters]
    if len({isinstance(t, str) for t in targets}) > 1:
        raise InputError(
            "all adapter configs should follow the same target modules type: combining adapters with "
            "target_modules as a list and as a string is not supported (PEFT's rule)"
        )
    if isinstance(targets[0], str):
        new_targets: object = "|".join(f"({t})" for t in targets)
    else:
        new_targets = sorted({name for names in targets for name in (names or [])})
    return kind, new_rank, new_targets


def peft_module(
    module: str,
    present: list[tuple[int, ModuleDelta]],
    adapters: list[Adapter],
    weights: list[float],
    kind: str,
    new_rank: int,
    options: PeftCombine,
) -> PeftModuleResult:
    """One module of the new adapter, as add_weighted_adapter fills it."""
    cpu = torch.device("cpu")
    embedding = any(source.layout == "embedding" for _, source in present)
    factors = []
    for index, source in present:
        assert source.factors is not None
        a_key, b_key, scale, _ = source.factors
        ctx = EditContext(adapters[index], cpu)
        factors.append((index, ctx.load(a_key), ctx.load(b_key), scale))
    if kind == "cat":
        a_parts = [a * weights[index] * scale for index, a, _, scale in factors]
        b_parts = [b for _, _, b, _ in factors]
        a_cat, b_cat = torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1)
        a = torch.zeros(new_rank, a_cat.shape[1], dtype=a_cat.dtype)
        b = torch.zeros(b_cat.shape[0], new_rank, dtype=b_cat.dtype)
        a[: a_cat.shape[0], :] = a_cat
        b[:, : b_cat.shape[1]] = b_cat
        return PeftModuleResult(module, a, b, embedding, None)
    if kind in FACTORWISE:
        weights_a, weights_b = [], []
        for index, _, _, scale in factors:
            with_scaling = weights[index] * scale
            sign = 1 if with_scaling >= 0 else -1
            weights_a.append(math.sqrt(abs(with_scaling)) * sign)
            weights_b.append(math.sqrt(abs(with_scaling)))
        results = []
        for side, side_weights in (("lora_A", weights_a), ("lora_B", weights_b)):
            tensors = [a if side == "lora_A" else b for _, a, b, _ in factors]
            generators = [dare_generator(options.seed, i, f"{module}.{side}") for i, _, _, _ in factors]
            combined = peft_method(
                kind, tensors, torch.tensor(side_weights), options.density, options.majority_sign, generators
            )
            results.append(combined.to(tensors[0].dtype))
        return PeftModuleResult(module, results[0], results[1], embedding, None)
    # The *_svd methods: get_delta_weight (weight orientation), combined, back to B @ A's orientation, SVD.
    fan_in_fan_out = bool(adapters[present[0][0]].config.get("fan_in_fan_out"))
    deltas = []
    for _, a, b, scale in factors:
        product = b @ a
        deltas.append((product.T if fan_in_fan_out or embedding else product) * scale)
    generators = [dare_generator(options.seed, i, f"{module}.weight") for i, _, _, _ in factors]
    method = kind.removesuffix("_svd") if kind != "svd" else "svd"
    delta = peft_method(
        method,
        deltas,
        torch.tensor([weights[i] for i, _, _, _ in factors]),
        options.density,
        options.majority_sign,
        generators,
    )
    if fan_in_fan_out or embedding:
        delta = delta.T
    u, s, vh = torch.linalg.svd(delta, full_matrices=True)
    u = u[:, :new_rank] @ torch.diag(s[:new_rank])
    total = float((s.double() ** 2).sum())
    kept = float((s[:new_rank].double() ** 2).sum() / total) if total else 1.0
    return PeftModuleResult(module, vh[:new_rank, :], u, embedding, kept)


def peft_config(adapters: list[Adapter], new_rank: int, new_targets: object) -> dict[str, object]:
    """Adapter 0's config with r = lora_alpha = the new rank and no patterns (dataclasses.replace in PEFT)."""
    config = copy.deepcopy(adapters[0].config)
    config.update(r=new_rank, lora_alpha=new_rank, target_modules=new_targets, alpha_pattern={}, rank_pattern={})
    return config


@dataclass
class PeftModuleReport:
    module: str
    inputs: int
    rank: int
    energy_kept: float | None


@dataclass
class PeftWritten:
    kind: str  # the combination type PEFT ran (one adapter: linear)
    modules: list[PeftModuleReport]
    config: dict[str, object]


def write_peft_weighted_adapter(
    adapter_dirs: list[Path],
    weights: list[float],
    out: Path,
    options: PeftCombine,
    *,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> PeftWritten:
    """Write to `out` the adapter add_weighted_adapter would make from these LoRA adapters, as PEFT saves it."""
    adapters = [load_adapter(path) for path in adapter_dirs]
    kind, new_rank, new_targets = check_peft(adapters, options)
    sources: list[dict[str, ModuleDelta]] = []
    for adapter in adapters:
        if adapter.peft_type != "LORA":
            raise UnsupportedAdapterError(
                f"is a {adapter.peft_type} adapter: PEFT's add_weighted_adapter combines LoRA only",
                path=adapter.directory,
                fix="drop --peft-compatible, or loractl resize it to a LoRA first",
            )
        found, biases = module_deltas(adapter, kind_for(adapter).edits(adapter, lambda name: None))
        if biases:
            raise UnsupportedAdapterError(
                "has lora_bias tensors, which PEFT's add_weighted_adapter leaves at zero",
                path=adapter.directory,
                fix="drop --peft-compatible",
            )
        sources.append({source.module: source for source in found})
    order = list(dict.fromkeys(module for found in sources for module in found))
    needed = sum(a.weights.nbytes(k) for a in adapters for k in a.weights.keys())  # noqa: SIM118
    check_output(out, list(adapter_dirs), overwrite=overwrite, needed_bytes=needed)
    modules: list[PeftModuleReport] = []
    with atomic_directory(out, overwrite=overwrite) as tmp:
        writer = AdapterWriter(tmp)
        try:
            for module in order:
                present = [(i, found[module]) for i, found in enumerate(sources) if module in found]
                result = peft_module(module, present, adapters, weights, kind, new_rank, options)
                writer.add_lora(
                    module, result.a.to(dtype), result.b.to(dtype), alpha=new_rank, embedding=result.embedding
                )
                modules.append(PeftModuleReport(module, len(present), int(result.a.shape[0]), result.energy_kept))
            config = peft_config(adapters, new_rank, new_targets)
            writer.finish(config)
        except BaseException:
            writer.abort()
            raise
    return PeftWritten(kind, modules, config)
