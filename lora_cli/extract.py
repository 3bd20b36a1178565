"""`loractl extract BASE TUNED OUT`: a PEFT LoRA adapter whose merge into BASE approximates TUNED.

Streams the two checkpoints tensor pair by tensor pair through the shared pipeline (the next pair is read while
this one is decomposed, the last one written): each changed 2-D weight of a linear layer gets a truncated SVD of
its fp32 delta (tuned - base), written as lora_A/lora_B with the singular values split evenly between them and
lora_alpha = r (scale 1), as mergekit-extract-lora writes them. Changed embeddings, output heads, norms and other
tensors go whole to `modules_to_save`; a changed bias of an extracted linear becomes PEFT's `lora_bias`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_cli.adapter_writer import AdapterWriter, lora_config, module_names
from lora_cli.device import pick_device
from lora_cli.errors import AdapterMismatchError, InputError, NonFiniteError
from lora_cli.io.atomic import atomic_directory, check_output
from lora_cli.io.checkpoint import CheckpointIndex, open_checkpoint
from lora_cli.io.safetensors_file import read_tensor
from lora_cli.lowrank import Truncation, factor_dtype, relative_error, tensor_seed, truncated_svd
from lora_cli.memstats import MemoryMonitor
from lora_cli.module_kinds import module_kinds
from lora_cli.numerics import all_finite
from lora_cli.stream import Pipeline


@dataclass(frozen=True)
class ExtractOptions:
    truncation: Truncation
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    device: str = "auto"
    dtype: str = "float32"  # of the written factors
    overwrite: bool = False


@dataclass
class ModuleReport:
    """What became of one changed tensor: LoRA factors (with rank, energy kept, error), or saved whole."""

    tensor: str
    role: str  # "lora", "lora_bias" or "modules_to_save"
    shape: list[int]
    rank: int | None = None
    energy_kept: float | None = None
    relative_error: float | None = None
    method: str | None = None


@dataclass
class ExtractSummary:
    output: str
    modules: list[ModuleReport]
    tensors_total: int
    tensors_unchanged: int
    tensors_excluded: int
    energy_kept: float  # over every extracted module: sum of kept s^2 over sum of squared delta norms
    relative_error: float  # ||all deltas - all reconstructions|| / ||all deltas||
    files: list[str]
    seconds: float
    peak_rss_anon_bytes: int
    peak_gpu_bytes: int | None
    device: str
    config: dict[str, object]
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Lora:
    module: str
    a: torch.Tensor
    b: torch.Tensor
    report: ModuleReport
    delta_sq: float


@dataclass
class _Whole:
    tensor: str
    value: torch.Tensor  # the tuned tensor as stored (modules_to_save), or a 1-D fp32 delta (bias, deferred)
    delta: torch.Tensor | None
    shape_changed: bool = False


def _module(tensor: str) -> str:
    return tensor.rsplit(".", 1)[0] if "." in tensor else tensor


def _selected(module: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    if include and not any(re.search(pattern, module) for pattern in include):
        return False
    return not any(re.search(pattern, module) for pattern in exclude)


def _compile(patterns: tuple[str, ...], option: str) -> None:
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise InputError(f"{option} {pattern!r} is not a regular expression ({exc})") from None


def _check_names(base: CheckpointIndex, tuned: CheckpointIndex) -> None:
    only_base = [name for name in base.tensors if name not in tuned.tensors]
    only_tuned = [name for name in tuned.tensors if name not in base.tensors]
    if only_base or only_tuned:
        where, names = (base.directory, only_base) if only_base else (tuned.directory, only_tuned)
        raise AdapterMismatchError(
            f"holds {len(names)} tensor(s) the other checkpoint lacks, e.g. {names[0]!r}",
            path=where,
            fix="BASE and TUNED must be the same architecture with the same tensor names (untie or tie both alike)",
        )


def extract(
    base_dir: Path,
    tuned_dir: Path,
    out: Path,
    options: ExtractOptions,
    *,
    base_ref: str | None = None,
    progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> ExtractSummary:
    """Write to `out` a LoRA adapter approximating TUNED - BASE; see the module docstring."""
    started = time.perf_counter()
    how = options.truncation
    how.check()
    dtype = factor_dtype(options.dtype)
    _compile(options.include, "--include")
    _compile(options.exclude, "--exclude")
    device = pick_device(options.device)

    base, tuned = open_checkpoint(base_dir), open_checkpoint(tuned_dir)
    _check_names(base, tuned)
    kinds = module_kinds(tuned.config(), list(tuned.tensors))
    jobs = [name for name in base.tensors if _selected(_module(name), options.include, options.exclude)]
    excluded = len(base.tensors) - len(jobs)
    check_output(
        out,
        [base_dir, tuned_dir],
        overwrite=options.overwrite,
        needed_bytes=_largest_output(tuned, jobs, kinds, how, dtype),
    )
    if on_total is not None:
        on_total(sum(base.tensors[n].nbytes + tuned.tensors[n].nbytes for n in jobs))

    def load(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        pair = read_tensor(base.tensors[name]), read_tensor(tuned.tensors[name])
        if progress is not None:
            progress(base.tensors[name].nbytes + tuned.tensors[name].nbytes)
        return pair

    def compute(name: str, pair: tuple[torch.Tensor, torch.Tensor]) -> _Lora | _Whole | None:
        old, new = pair
        module, kind = _module(name), kinds.get(_module(name), "other")
        if old.shape != new.shape:
            if kind != "embedding":
                raise AdapterMismatchError(
                    f"tensor {name} is {tuple(old.shape)} in BASE but {tuple(new.shape)} in TUNED",
                    path=tuned.directory,
                    fix="only embeddings and output heads may change size (a resized vocabulary)",
                )
            return _Whole(name, new, None, shape_changed=True)
        if torch.equal(old, new):
            return None
        if not new.is_floating_point():
            return _Whole(name, new, None)
        if not all_finite(new):
            raise NonFiniteError(f"tensor {name} holds NaN or Inf", path=tuned.directory, fix="the fine-tune is broken")
        if new.ndim == 2 and kind in ("linear", "conv1d") and name.endswith(".weight"):
            delta = new.to(device=device, dtype=torch.float32)
            delta.sub_(old.to(device))  # promoted element by element: no second fp32 copy of the weight
            if kind == "conv1d":  # stored [in, out]; PEFT's fan_in_fan_out LoRA transposes B @ A
                delta = delta.T
            low = truncated_svd(delta, how, seed=tensor_seed(name))
            error = relative_error(delta, low)
            delta_sq = float(torch.linalg.vector_norm(delta)) ** 2
            report = ModuleReport(name, "lora", list(new.shape), low.a.shape[0], low.energy_kept, error, low.method)
            return _Lora(module, low.a.to(dtype).cpu(), low.b.to(dtype).cpu(), report, delta_sq)
        if new.ndim == 1:
            return _Whole(name, new, new.float() - old.float())
        return _Whole(name, new, None)

    loras: list[_Lora] = []
    deferred: list[_Whole] = []
    reports: list[ModuleReport] = []
    warnings: list[str] = []
    unchanged = 0

    with MemoryMonitor(keep_timeline=False) as memory, atomic_directory(out, overwrite=options.overwrite) as tmp:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        writer = AdapterWriter(tmp)

        def sink(name: str, result: _Lora | _Whole | None) -> None:
            nonlocal unchanged
            if result is None:
                unchanged += 1
            elif isinstance(result, _Lora):
                writer.add_lora(result.module, result.a, result.b, alpha=result.a.shape[0])
                loras.append(_Lora(result.module, result.a[:0], result.b[:0], result.report, result.delta_sq))
                reports.append(result.report)
            elif result.delta is not None:
                deferred.append(result)  # 1-D: tiny; placed once every module's fate is known
            else:
                writer.add_saved(name, result.value)
                reports.append(ModuleReport(name, "modules_to_save", list(result.value.shape)))
                if result.shape_changed:
                    warnings.append(
                        f"{name} is resized from {list(base.tensors[name].shape)} to {list(result.value.shape)}: "
                        f"resize the base's embeddings to {result.value.shape[0]} rows before loading the adapter"
                    )

        with writer:
            Pipeline(load, compute, sink, depth=1).run(jobs)
            extracted = {lora.module for lora in loras}
            for item in deferred:
                owner = _module(item.tensor)
                if item.tensor.endswith(".bias") and owner in extracted and item.delta is not None:
                    writer.add_lora_bias(owner, item.delta.to(dtype))
                    reports.append(ModuleReport(item.tensor, "lora_bias", list(item.value.shape)))
                else:
                    writer.add_saved(item.tensor, item.value)
                    reports.append(ModuleReport(item.tensor, "modules_to_save", list(item.value.shape)))
            # PEFT loads a modules_to_save module only whole: its unchanged tensors are written too (from TUNED).
            for name in tuned.tensors:
                if _module(name) in writer.saved_modules and not writer.has_saved(name):
                    writer.add_saved(name, read_tensor(tuned.tensors[name]))
            if writer.tensor_count == 0:
                raise InputError(
                    "no selected tensor differs from BASE: there is nothing to extract",
                    path=tuned.directory,
                    fix="check that TUNED is the fine-tuned model, and the --include/--exclude patterns",
                )
            candidates = sorted(
                m for m, kind in kinds.items() if kind in ("linear", "conv1d") and f"{m}.weight" in base.tensors
            )
            extracted_paths = [lora.module for lora in loras]
            config = lora_config(
                writer.lora_modules,
                target_modules=module_names(extracted_paths, candidates) if extracted_paths else [],
                modules_to_save=writer.saved_modules,
                base_model=base_ref or str(base_dir),
                lora_bias=bool(writer.bias_modules),
                fan_in_fan_out=any(kinds.get(m) == "conv1d" for m in extracted),
                task_type=_task_type(tuned.config()),
            )
            files = writer.finish(config)
        peak_gpu = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None

    total_sq = sum(lora.delta_sq for lora in loras)
    kept_sq = sum(lora.delta_sq * (lora.report.energy_kept or 0.0) for lora in loras)
    error_sq = sum(lora.delta_sq * (lora.report.relative_error or 0.0) ** 2 for lora in loras)
    return ExtractSummary(
        output=str(out),
        modules=reports,
        tensors_total=len(base.tensors),
        tensors_unchanged=unchanged,
        tensors_excluded=excluded,
        energy_kept=kept_sq / total_sq if total_sq else 1.0,
        relative_error=(error_sq / total_sq) ** 0.5 if total_sq else 0.0,
        files=files,
        seconds=time.perf_counter() - started,
        peak_rss_anon_bytes=memory.peak_anon,
        peak_gpu_bytes=peak_gpu,
        device=str(device),
        config=config,
        warnings=warnings,
    )


def _task_type(config: dict | None) -> str | None:
    architectures = (config or {}).get("architectures") or []
    causal = any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    return "CAUSAL_LM" if causal else None


def _largest_output(
    tuned: CheckpointIndex, jobs: list[str], kinds: dict[str, str], how: Truncation, dtype: torch.dtype
) -> int:
    """The most the adapter can take on disk: every linear weight changed at the largest rank it may get (the
    smaller side when only --energy bounds it), every other tensor saved whole."""
    total = 0
    for name in jobs:
        info = tuned.tensors[name]
        if len(info.shape) == 2 and kinds.get(_module(name)) in ("linear", "conv1d"):
            rows, cols = info.shape
            rank = min(rows, cols, how.rank or how.max_rank or min(rows, cols))
            total += (rows + cols) * rank * dtype.itemsize
        else:
            total += info.nbytes
    return total
