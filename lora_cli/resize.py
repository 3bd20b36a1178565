"""`loractl resize ADAPTER OUT`: the best rank-R (or --energy) LoRA approximation of each module's delta.

A LoRA module's delta is scale * B @ A: its SVD comes from QR of the two factors and an r x r SVD (lowrank.
factored_svd), so the full matrix is never formed and the result is the exact best approximation (fp64). LoHa
and LoKr modules have no such factors: their delta is formed (as the merge does) and truncated like a fine-tune's
in `extract`, which converts them to LoRA. Every new module has lora_alpha = r (scale 1); biases and full tensors
(modules_to_save) are carried over.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_cli.adapter_writer import AdapterWriter, lora_config
from lora_cli.adapters.base import Adapter, EditContext
from lora_cli.adapters.loading import load_adapter
from lora_cli.adapters.registry import kind_for
from lora_cli.errors import InputError, UnsupportedAdapterError
from lora_cli.io.atomic import atomic_directory, check_output
from lora_cli.lowrank import TruncatedSvd, Truncation, factor_dtype, factored_svd, tensor_seed, truncated_svd
from lora_cli.module_deltas import module_deltas

RESIZABLE = ("LORA", "LOHA", "LOKR")


@dataclass(frozen=True)
class ResizeOptions:
    truncation: Truncation
    dtype: str = "float32"
    overwrite: bool = False


@dataclass
class ResizedModule:
    module: str
    old_rank: int | None  # None for LoHa/LoKr (their delta's rank is not a stored number)
    rank: int
    energy_kept: float
    method: str


@dataclass
class ResizeSummary:
    output: str
    source_type: str
    modules: list[ResizedModule]
    energy_kept: float  # over all modules: kept s^2 over the deltas' total squared norm
    carried: list[str]  # tensors copied unchanged (biases rescaled, modules_to_save)
    seconds: float
    config: dict[str, object]
    warnings: list[str] = field(default_factory=list)


def resize(adapter_dir: Path, out: Path, options: ResizeOptions) -> ResizeSummary:
    started = time.perf_counter()
    how = options.truncation
    how.check()
    dtype = factor_dtype(options.dtype)
    adapter = load_adapter(adapter_dir)
    if adapter.peft_type not in RESIZABLE:
        raise UnsupportedAdapterError(
            f"is a {adapter.peft_type} adapter; resize takes LoRA, LoHa or LoKr",
            path=adapter.directory,
            fix="merge it and extract a LoRA with loractl extract",
        )
    if adapter.token_rows:
        raise UnsupportedAdapterError(
            "carries trainable_token_indices rows, which resize does not carry over",
            path=adapter.directory,
            fix="merge it and extract a LoRA with loractl extract",
        )
    sources, biases = module_deltas(adapter, kind_for(adapter).edits(adapter, lambda name: None))
    if not sources:
        raise InputError("has no module to resize", path=adapter.directory)
    needed = sum(adapter.weights.nbytes(key) for key in adapter.weights.keys())  # noqa: SIM118
    check_output(out, [adapter_dir], overwrite=options.overwrite, needed_bytes=needed)
    ctx = EditContext(adapter, torch.device("cpu"))
    wide = EditContext(adapter, torch.device("cpu"), work_dtype=torch.float64)

    modules: list[ResizedModule] = []
    carried: list[str] = []
    total_sq = kept_sq = 0.0
    with atomic_directory(out, overwrite=options.overwrite) as tmp, AdapterWriter(tmp) as writer:
        for source in sources:
            low: TruncatedSvd
            if source.factors is not None:
                a_key, b_key, scale, old_rank = source.factors
                a, b = wide.load(a_key), wide.load(b_key)
                low = factored_svd(b * scale, a, how)
                new_a, new_b = low.a, low.b
                delta_sq = float((low.singular.double() ** 2).sum()) / max(low.energy_kept, 1e-300)
            else:
                assert source.edit is not None and source.shape is not None
                old_rank = None
                delta = source.edit.delta(source.shape, ctx)
                low = truncated_svd(delta, how, seed=tensor_seed(source.module))
                new_a, new_b = low.a, low.b
                delta_sq = float(torch.linalg.vector_norm(delta)) ** 2
            rank = int(new_a.shape[0])
            writer.add_lora(
                source.module,
                new_a.to(dtype),
                new_b.to(dtype),
                alpha=rank,
                embedding=source.layout == "embedding",
            )
            modules.append(ResizedModule(source.module, old_rank, rank, low.energy_kept, low.method))
            total_sq += delta_sq
            kept_sq += delta_sq * low.energy_kept
        for module, key, scale in biases:  # lora_B.bias is scaled like the delta: fold the old scale in
            writer.add_lora_bias(module, (ctx.load(key) * scale).to(dtype))
            carried.append(f"{module}.lora_B.bias")
        for name, key in adapter.full_tensors.items():
            writer.add_raw(key, adapter.weights.load(key))
            carried.append(name)
        config = _config(adapter, writer)
        writer.finish(config)
    return ResizeSummary(
        output=str(out),
        source_type=adapter.peft_type,
        modules=modules,
        energy_kept=kept_sq / total_sq if total_sq else 1.0,
        carried=carried,
        seconds=time.perf_counter() - started,
        config=config,
    )


def _config(adapter: Adapter, writer: AdapterWriter) -> dict[str, object]:
    old = adapter.config
    new = lora_config(
        writer.lora_modules,
        target_modules=old.get("target_modules") or sorted(m.path for m in writer.lora_modules),
        modules_to_save=list(old.get("modules_to_save") or []),
        base_model=old.get("base_model_name_or_path"),
        lora_bias=bool(writer.bias_modules),
        fan_in_fan_out=bool(old.get("fan_in_fan_out")) and adapter.peft_type == "LORA",
        task_type=old.get("task_type"),
    )
    if adapter.peft_type != "LORA":
        return new
    # A LoRA keeps every other setting it had (layers_to_transform, exclude_modules, ...): only the ranks, the
    # scales and the variants that a resize removes change.
    kept = copy.deepcopy(old)
    kept.update({key: new[key] for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "lora_bias")})
    kept.update({"use_rslora": False, "use_dora": False})
    return kept
