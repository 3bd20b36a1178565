"""`loractl combine A@w B@w ... OUT`: several adapters combined into one PEFT LoRA adapter, module by module.

`cat` is exact: the factors are stacked (A_i scaled by w_i times the adapter's scale, as PEFT's
add_weighted_adapter(combination_type="cat") does), so B @ A is the weighted sum of the deltas. Every other method
forms each adapter's fp32 delta for the module, combines them as `merge --combine` does (lora_cli.combine, the same
DARE masks: the seed takes the module's weight name and the adapter's position), and truncates the result with an
SVD to --rank (default: the largest input rank) or --energy, reporting the share of the combined delta's energy
kept. One module's deltas are in memory at a time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_cli.adapter_writer import AdapterWriter, lora_config
from lora_cli.adapters.base import Adapter, EditContext
from lora_cli.adapters.loading import load_adapter
from lora_cli.adapters.registry import kind_for
from lora_cli.combine import CombineOptions, combine_deltas
from lora_cli.errors import InputError, UnsupportedAdapterError
from lora_cli.io.atomic import atomic_directory, check_output
from lora_cli.lowrank import Truncation, factor_dtype, tensor_seed, truncated_svd
from lora_cli.module_deltas import ModuleDelta, module_deltas
from lora_cli.peft_weighted import PeftCombine, write_peft_weighted_adapter

ADAPTER_METHODS = ("cat", "sum", "ties", "dare_linear", "dare_ties", "magnitude_prune")


@dataclass(frozen=True)
class CombineAdaptersOptions:
    method: str = "cat"
    density: float | None = None  # None: 1 (no sparsification), except under peft_compatible (PEFT needs one)
    majority_sign: str = "total"
    seed: int = 0
    normalize: bool | None = None
    truncation: Truncation | None = None  # None: every module at the largest input rank (PEFT's svd default)
    dtype: str = "float32"
    overwrite: bool = False
    peft_compatible: bool = False  # follow PEFT's add_weighted_adapter (lora_cli.peft_weighted) instead


@dataclass
class CombinedModule:
    module: str
    inputs: int  # how many of the adapters adapt it
    rank: int
    energy_kept: float | None  # None for cat (exact)


@dataclass
class CombineSummary:
    output: str
    method: str
    modules: list[CombinedModule]
    energy_kept: float | None
    seconds: float
    config: dict[str, object]
    warnings: list[str] = field(default_factory=list)


def _check(adapter: Adapter) -> None:
    if adapter.full_tensors or adapter.token_rows:
        raise UnsupportedAdapterError(
            "carries modules_to_save or trainable-token tensors, which have no delta to combine",
            path=adapter.directory,
            fix="combine adapters without them, or merge them in order with loractl merge",
        )


def _delta(source: ModuleDelta, adapter: Adapter) -> torch.Tensor:
    """The module's fp32 delta at weight 1, in PEFT's orientation (B @ A), as the merge computes it."""
    if source.factors is not None:
        a_key, b_key, scale, _ = source.factors
        ctx = EditContext(adapter, torch.device("cpu"))
        return (ctx.load(b_key) @ ctx.load(a_key)) * scale
    assert source.edit is not None and source.shape is not None
    return source.edit.delta(source.shape, EditContext(adapter, torch.device("cpu")))


def combine_adapters(
    adapter_dirs: list[Path], weights: list[float], out: Path, options: CombineAdaptersOptions
) -> CombineSummary:
    started = time.perf_counter()
    if options.peft_compatible:
        return _combine_as_peft(adapter_dirs, weights, out, options, started)
    if options.method not in ADAPTER_METHODS:
        raise InputError(f"--method {options.method!r} is not one of {', '.join(ADAPTER_METHODS)}")
    if len(adapter_dirs) < 1:
        raise InputError("combine needs at least one ADAPTER and OUT", fix="see loractl combine --help")
    combine = None
    if options.method != "cat":
        combine = CombineOptions(
            method=options.method,
            density=1.0 if options.density is None else options.density,
            majority_sign=options.majority_sign,
            seed=options.seed,
            normalize=options.normalize,
        )
    dtype = factor_dtype(options.dtype)
    adapters = [load_adapter(path) for path in adapter_dirs]
    sources: list[dict[str, ModuleDelta]] = []
    for adapter in adapters:
        _check(adapter)
        found, biases = module_deltas(adapter, kind_for(adapter).edits(adapter, lambda name: None))
        if biases:
            raise UnsupportedAdapterError(
                "has lora_bias tensors, which combine does not carry",
                path=adapter.directory,
                fix="merge it with loractl merge instead",
            )
        for source in found:
            if options.method == "cat" and source.factors is None:
                raise UnsupportedAdapterError(
                    f"is a {adapter.peft_type} adapter: cat stacks LoRA factors",
                    path=adapter.directory,
                    fix="use another --method (its delta is formed and truncated), or loractl resize it first",
                )
        sources.append({source.module: source for source in found})
    order = list(dict.fromkeys(module for found in sources for module in found))
    known_ranks = [s.factors[3] for found in sources for s in found.values() if s.factors is not None]
    truncation = options.truncation
    if truncation is None and options.method != "cat":
        if not known_ranks:
            raise InputError("no input has a LoRA rank to default to", fix="pass --rank or --energy")
        truncation = Truncation(rank=max(known_ranks))
    needed = sum(a.weights.nbytes(k) for a in adapters for k in a.weights.keys())  # noqa: SIM118
    check_output(out, list(adapter_dirs), overwrite=options.overwrite, needed_bytes=needed)

    modules: list[CombinedModule] = []
    kept_sq = total_sq = 0.0
    with atomic_directory(out, overwrite=options.overwrite) as tmp, AdapterWriter(tmp) as writer:
        for module in order:
            present = [(i, found[module]) for i, found in enumerate(sources) if module in found]
            layouts = {"linear" if s.layout == "formed" else s.layout for _, s in present}
            if len(layouts) > 1:
                raise UnsupportedAdapterError(f"{module} is adapted as {' and '.join(sorted(layouts))}")
            embedding = layouts == {"embedding"}
            if combine is None:
                a_parts, b_parts = [], []
                for i, source in present:
                    assert source.factors is not None
                    a_key, b_key, scale, _ = source.factors
                    ctx = EditContext(adapters[i], torch.device("cpu"))
                    a_parts.append(ctx.load(a_key) * weights[i] * scale)  # PEFT's cat: the weight goes into A
                    b_parts.append(ctx.load(b_key))
                a, b = torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1)
                writer.add_lora(module, a.to(dtype), b.to(dtype), alpha=a.shape[0], embedding=embedding)
                modules.append(CombinedModule(module, len(present), int(a.shape[0]), None))
                continue
            assert truncation is not None
            deltas = [_delta(source, adapters[i]) for i, source in present]
            combined = combine_deltas(
                deltas,
                [weights[i] for i, _ in present],
                combine,
                tensor=f"{module}.weight",
                positions=[i for i, _ in present],
                all_weights=weights,
            )
            del deltas
            low = truncated_svd(combined, truncation, seed=tensor_seed(module))
            norm_sq = float(torch.linalg.vector_norm(combined)) ** 2
            kept_sq += norm_sq * low.energy_kept
            total_sq += norm_sq
            rank = int(low.a.shape[0])
            writer.add_lora(module, low.a.to(dtype), low.b.to(dtype), alpha=rank, embedding=embedding)
            modules.append(CombinedModule(module, len(present), rank, low.energy_kept))
        config = lora_config(
            writer.lora_modules,
            target_modules=_target_modules(adapters, order),
            modules_to_save=[],
            base_model=adapters[0].config.get("base_model_name_or_path"),
            fan_in_fan_out=bool(adapters[0].config.get("fan_in_fan_out")),
            task_type=adapters[0].config.get("task_type"),
        )
        writer.finish(config)
    return CombineSummary(
        output=str(out),
        method=options.method,
        modules=modules,
        energy_kept=None if combine is None else (kept_sq / total_sq if total_sq else 1.0),
        seconds=time.perf_counter() - started,
        config=config,
    )


def _target_modules(adapters: list[Adapter], modules: list[str]) -> list[str]:
    """The union of the inputs' target_modules when all are plain name lists (they selected these modules in
    the base, so their union selects the union), else the full module paths, which PEFT matches exactly."""
    lists = [a.config.get("target_modules") for a in adapters]
    plain = all(isinstance(t, list) for t in lists) and not any(a.config.get("layers_to_transform") for a in adapters)
    if plain:
        return sorted({name for names in lists for name in names})  # type: ignore[union-attr]
    return sorted(modules)


def _combine_as_peft(
    adapter_dirs: list[Path], weights: list[float], out: Path, options: CombineAdaptersOptions, started: float
) -> CombineSummary:
    """`--peft-compatible`: the adapter PEFT's add_weighted_adapter would make, saved as PEFT saves it."""
    factor_dtype(options.dtype)
    if options.truncation is not None and options.truncation.rank is None:
        raise InputError("--peft-compatible truncates to a rank (PEFT's svd_rank): pass --rank, not --energy")
    peft = PeftCombine(
        combination_type=options.method,
        svd_rank=options.truncation.rank if options.truncation else None,
        density=options.density,
        majority_sign=options.majority_sign,
        seed=options.seed,
    )
    written = write_peft_weighted_adapter(
        adapter_dirs, weights, out, peft, dtype=factor_dtype(options.dtype), overwrite=options.overwrite
    )
    modules = [CombinedModule(m.module, m.inputs, m.rank, m.energy_kept) for m in written.modules]
    kept = [m.energy_kept for m in modules if m.energy_kept is not None]
    return CombineSummary(
        output=str(out),
        method=f"{written.kind} (PEFT)",
        modules=modules,
        energy_kept=sum(kept) / len(kept) if kept else None,
        seconds=time.perf_counter() - started,
        config=written.config,
    )
