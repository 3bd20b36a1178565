"""`loractl memory`: predict what a merge will cost in RAM before running it, and measure it when asked.

The in-memory path (transformers loads the whole base, PEFT adds the adapter, `merge_and_unload`,
`save_pretrained`) costs the whole model in its load dtype and the adapter in fp32; when loading converts the
dtype, the mapped shards stay resident beside the converted copy until loading ends. loractl's streaming merge
costs this process's baseline plus a few tensors: the largest edited tensor's working set and the engine's rings
of input and output buffers. Both models are checked against measurements on the 1.1B synthetic checkpoint in
README.md ("What a merge will cost") and by tests/test_memory.py.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

from lora_cli.adapters.base import Adapter
from lora_cli.engine import (
    ADDITIVE_WORK_COPIES,
    UNFUSED_WORK_COPIES,
    WriteOptions,
    fused_block_elements,
    write_merge,
)
from lora_cli.host_buffers import INPUT_BUFFERS, OUTPUT_BUFFERS
from lora_cli.io.checkpoint import CheckpointIndex
from lora_cli.io.dtypes import SAFETENSORS_TO_TORCH, dominant_dtype, is_float
from lora_cli.memstats import MemoryMonitor, MemorySample, read_rss
from lora_cli.peft_reference import PHASE_PREFIX, RESULT_PREFIX
from lora_cli.plan import MergePlan, PlannedTensor, build_plan, working_dtype
from lora_cli.resolve import ResolvedSource
from lora_cli.sources import AdapterSpec, prepare

# The engine reads into a ring of INPUT_BUFFERS host buffers, computes in reused buffers (`Workspace`) and writes
# from a ring of OUTPUT_BUFFERS host buffers that the writer drains; each ring's buffers are the size of the
# largest edited tensor (`host_buffers.py`). The working copies per edited tensor are the engine's own
# (`engine.ADDITIVE_WORK_COPIES`, `engine.UNFUSED_WORK_COPIES`); whether a chain is fused, each edit's `form` says.
# A fresh python process with torch, transformers and peft imported is measured (`reference_process_bytes`): it
# moves with the installed versions (389 MiB with torch 2.13, transformers 5.23 and peft 0.21; 435 MiB with
# transformers 5.24 and bitsandbytes installed, which peft imports) and with a CUDA build of torch (1.2 GB). This
# value stands in where the probe cannot run (peft not installed).
REFERENCE_PROCESS_FALLBACK_BYTES = 390 * 2**20
REFERENCE_MODULE = "lora_cli.peft_reference"
TIMELINE_POINTS = 100


@dataclass
class PathEstimate:
    """Predicted peak of one way to merge, with the terms it adds up."""

    name: str
    peak_bytes: int
    gpu_bytes: int | None
    fits: bool
    terms: dict[str, int]


@dataclass
class Prediction:
    in_memory_peak_bytes: int  # transformers + PEFT, base loaded in its own dtype
    in_memory_fp32_peak_bytes: int  # the same with the base upcast to fp32
    streaming_peak_bytes: int  # loractl merge
    in_memory_gpu_bytes: int | None
    streaming_gpu_bytes: int | None
    baseline_bytes: int
    largest_edited_tensor: str | None
    tensors_edited: int
    base_bytes: int
    adapter_bytes: int
    total_ram_bytes: int
    available_ram_bytes: int
    paths: list[PathEstimate]


@dataclass
class PhasePeak:
    phase: str
    seconds: float
    peak_anon_bytes: int
    peak_file_bytes: int


@dataclass
class Measurement:
    """A measured run: peak anonymous memory (what the merge needs) and file-backed pages apart."""

    path: str
    peak_anon_bytes: int
    peak_file_bytes: int
    peak_rss_bytes: int  # the largest anonymous + file-backed total of any one sample
    baseline_anon_bytes: int
    seconds: float
    phases: list[PhasePeak]
    timeline: list[MemorySample] = field(default_factory=list)  # at most TIMELINE_POINTS samples
    error: str | None = None
    # The kernel's exact resident high-water mark (VmHWM, anonymous + file-backed) over the run, and the resident
    # size when it started: samples every 20 ms can miss a transient peak, the kernel cannot. None where unsupported.
    kernel_peak_rss_bytes: int | None = None
    start_rss_bytes: int | None = None
    peak_gpu_bytes: int | None = None  # torch's max allocated, for a merge run on CUDA


@dataclass
class MemoryReport:
    base: str
    adapters: list[str]
    device: str
    predicted: Prediction
    measured: dict[str, Measurement] = field(default_factory=dict)


def _dtype_of(index: CheckpointIndex) -> str:
    """The dtype most of the checkpoint's bytes are in (what `dtype="auto"` loads)."""
    return dominant_dtype((info.dtype, info.nbytes) for info in index.tensors.values()) or "F32"


def _model_bytes(index: CheckpointIndex, float_itemsize: int | None) -> int:
    """The base in memory: floating tensors at `float_itemsize` bytes (None keeps each tensor's own)."""
    total = 0
    for info in index.tensors.values():
        size = float_itemsize if float_itemsize is not None and is_float(info.dtype) else info.torch_dtype.itemsize
        total += info.numel * size
    return total


def _adapter_params(adapters: list[Adapter]) -> int:
    return sum(math.prod(a.weights.shape(k)) for a in adapters for k in a.weights.keys())  # noqa: SIM118


def _edit_factor_bytes(planned: PlannedTensor) -> int:
    """The adapter tensors one edited tensor loads (in working precision)."""
    itemsize = working_dtype(planned.source).itemsize
    keys = {(id(e.adapter), k) for e in planned.edits for k in e.adapter_keys()}
    by_id = {id(e.adapter): e.adapter for e in planned.edits}
    return sum(math.prod(by_id[a].weights.shape(k)) * itemsize for a, k in keys)


def _work_elements(planned: PlannedTensor, fused_device: bool) -> int:
    """Working-precision elements alive while `planned` is computed: copies of the output's size, or, where every
    edit forms its delta by rows, one or two block buffers (`engine.fused_block_elements`)."""
    shape = tuple(planned.source.shape)
    numel = math.prod(planned.output.shape)
    if not all(edit.form.is_additive for edit in planned.edits):
        return UNFUSED_WORK_COPIES * numel
    if fused_device and shape == tuple(planned.output.shape):
        if shape and all(edit.form.row_blocks for edit in planned.edits):
            return min(len(planned.edits), 2) * fused_block_elements(shape)
        return len(planned.edits) * numel
    return ADDITIVE_WORK_COPIES * numel


def streaming_working_set(plan: MergePlan, device: str = "cpu") -> tuple[dict[str, int], str | None]:
    """Bytes above the baseline while `write_plan` streams `plan`, by term, and the tensor that sizes them.

    The engine's buffers grow to the largest edited tensor and stay: the fp32 deltas (and working copy), and the
    rings of raw inputs and of outputs. Untouched tensors are byte-range copies and hold nothing; one module's
    factors are loaded at a time. On a GPU, the working copies and one output buffer live on the device.
    """
    edited = [planned for planned in plan.tensors if not planned.is_copy]
    work = factors = 0
    largest = None
    for planned in edited:
        size = _work_elements(planned, not device.startswith("cuda")) * working_dtype(planned.source).itemsize
        if size > work:
            work, largest = size, planned.name
        factors = max(factors, _edit_factor_bytes(planned))
    # A ring allocates its buffers as it first goes round: fewer than its size when few tensors are edited.
    outputs, inputs = min(OUTPUT_BUFFERS, len(edited)), min(INPUT_BUFFERS, len(edited))
    terms = {
        "fp32 deltas / working copies": work,
        f"{outputs} output buffers": outputs * max((p.output.nbytes for p in edited), default=0),
        f"{inputs} raw input buffers": inputs * max((p.source.nbytes for p in edited), default=0),
        "one module's factors": factors,
    }
    return terms, largest


def predict(
    base: CheckpointIndex, adapters: list[Adapter], device: str = "cpu", baseline: int | None = None
) -> Prediction:
    """Predict both paths' peaks from the plan alone: nothing is loaded but headers and configs."""
    return predict_plan(build_plan(base, adapters), device, baseline)


def predict_plan(plan: MergePlan, device: str = "cpu", baseline: int | None = None) -> Prediction:
    """`predict` for a plan already built (by `sources.prepare`)."""
    base, adapters = plan.base, plan.adapters
    cuda = device.startswith("cuda")  # a prediction for a GPU this machine may not have
    own_itemsize = SAFETENSORS_TO_TORCH[_dtype_of(base)].itemsize
    adapter_params = _adapter_params(adapters)
    adapter_fp32 = adapter_params * 4  # PEFT keeps adapter weights in fp32 (autocast_adapter_dtype)
    memory = psutil.virtual_memory()

    def in_memory(itemsize: int, label: str) -> PathEstimate:
        model = _model_bytes(base, itemsize)
        terms = {
            "python + torch + transformers + peft": reference_process_bytes(),
            "base model": model,
            "adapter (fp32)": adapter_fp32,
            # Converting while loading keeps the mapped shards resident beside the converted copy.
            "mapped shards while converting": base.file_bytes if itemsize != own_itemsize else 0,
        }
        gpu = None
        if cuda:
            gpu = model + adapter_fp32  # device_map puts the whole model on the GPU
            terms["base model"] = 0
        peak = sum(terms.values())
        return PathEstimate(label, peak, gpu, peak <= memory.available, terms)

    working, largest = streaming_working_set(plan, device)
    # Measured after planning: a merge holds the plan, the adapters' headers and the modules they imported too.
    baseline = read_rss()[0] if baseline is None else baseline
    stream_terms = {"python + torch (measured)": baseline, **working}
    streaming_gpu = None
    if cuda:
        # On the GPU: the working copies, one output buffer and one module's factors. The host keeps its two rings
        # (page-locked, for fast copies) but no fp32 working copies.
        on_device = ("fp32", "one module")
        device_output = max((p.output.nbytes for p in plan.edited), default=0)
        # Inputs stored in another dtype than the working one are uploaded as stored, then converted there.
        upload = max((p.source.nbytes for p in plan.edited if _converts(p)), default=0)
        streaming_gpu = sum(v for k, v in working.items() if k.startswith(on_device)) + device_output + upload
        stream_terms = {k: v for k, v in stream_terms.items() if not k.startswith(on_device)}
        runtime = cuda_runtime_cost(device)
        if runtime is None:
            stream_terms["CUDA runtime (not measured: no GPU here)"] = 0
        else:
            stream_terms["CUDA runtime (measured)"] = runtime[0]
            streaming_gpu += runtime[1]
    stream_peak = sum(stream_terms.values())
    own = in_memory(own_itemsize, f"transformers + PEFT ({_torch_name(_dtype_of(base))})")
    fp32 = in_memory(4, "transformers + PEFT (float32)")
    streaming = PathEstimate(
        "loractl merge (streaming)", stream_peak, streaming_gpu, stream_peak <= memory.available, stream_terms
    )
    return Prediction(
        in_memory_peak_bytes=own.peak_bytes,
        in_memory_fp32_peak_bytes=fp32.peak_bytes,
        streaming_peak_bytes=stream_peak,
        in_memory_gpu_bytes=own.gpu_bytes,
        streaming_gpu_bytes=streaming_gpu,
        baseline_bytes=baseline,
        largest_edited_tensor=largest,
        tensors_edited=len(plan.edited),
        base_bytes=base.total_bytes,
        adapter_bytes=sum(a.weights.nbytes(k) for a in adapters for k in a.weights.keys()),  # noqa: SIM118
        total_ram_bytes=memory.total,
        available_ram_bytes=memory.available,
        paths=[own, streaming] if own_itemsize == 4 else [own, fp32, streaming],
    )


def _converts(planned: PlannedTensor) -> bool:
    return SAFETENSORS_TO_TORCH[planned.source.dtype] != working_dtype(planned.source)


def cuda_runtime_cost(device: str) -> tuple[int, int] | None:
    """Host and GPU bytes that starting CUDA and cuBLAS costs this process: measured (by starting them), as they
    depend on the driver, the GPU and the libraries (on an H100: about 210 MiB of host memory and cuBLAS's 32 MiB
    workspace). None where no GPU is present to measure."""
    if not torch.cuda.is_available():
        return None
    before = read_rss()[0]
    probe = torch.ones(8, 8, device=device)
    (probe @ probe).sum().item()  # a matmul starts cuBLAS, which allocates its workspace on first use
    del probe
    torch.cuda.synchronize(device)
    return max(read_rss()[0] - before, 0), torch.cuda.memory_allocated(device)


def _torch_name(dtype: str) -> str:
    return str(SAFETENSORS_TO_TORCH[dtype]).removeprefix("torch.")


def phase_peaks(samples: list[MemorySample]) -> list[PhasePeak]:
    """The timeline folded into one row per phase, in order: how long it lasted and its peaks."""
    peaks: list[PhasePeak] = []
    for sample in samples:
        if not peaks or peaks[-1].phase != sample.phase:
            peaks.append(PhasePeak(sample.phase, sample.seconds, 0, 0))
        row = peaks[-1]
        row.peak_anon_bytes = max(row.peak_anon_bytes, sample.anon)
        row.peak_file_bytes = max(row.peak_file_bytes, sample.file)
    for row, following in zip(peaks, [*peaks[1:], None], strict=True):
        end = following.seconds if following is not None else samples[-1].seconds
        row.seconds = end - row.seconds
    return peaks


def _thin(samples: list[MemorySample]) -> list[MemorySample]:
    """Every k-th sample, so that a long run's timeline stays a readable size in --json."""
    step = max(1, math.ceil(len(samples) / TIMELINE_POINTS))
    return samples[::step]


def _peak_rss(samples: list[MemorySample]) -> int:
    return max((s.anon + s.file for s in samples), default=0)


def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux `clear_refs` 5); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def measure_streaming(base: ResolvedSource, adapters: list[AdapterSpec], device: str = "cpu") -> Measurement:
    """Run loractl's merge into a temporary folder (deleted after) while sampling this process's memory.

    The merge is `merge()`'s own two steps (`prepare`, then `engine.write_merge`), with the phase switched between
    them.
    """
    exact = _reset_peak_rss()
    start_rss = _status_kib("VmRSS") if exact else None
    with tempfile.TemporaryDirectory(prefix="loractl-memory-") as tmp, MemoryMonitor(phase="load") as monitor:
        started = time.perf_counter()
        options = WriteOptions(device=device)
        prepared = prepare(base, adapters, dtype=options.dtype)
        monitor.phase = "merge+write"
        summary = write_merge(prepared, Path(tmp) / "merged", options)
        monitor.phase = "done"
        seconds = time.perf_counter() - started
        kernel_peak = _status_kib("VmHWM") if exact else None
    return Measurement(
        path="loractl merge (streaming)",
        peak_anon_bytes=monitor.peak_anon,
        peak_file_bytes=monitor.peak_file,
        peak_rss_bytes=_peak_rss(monitor.samples),
        baseline_anon_bytes=monitor.baseline_anon,
        seconds=seconds,
        phases=phase_peaks(monitor.samples),
        timeline=_thin(monitor.samples),
        kernel_peak_rss_bytes=kernel_peak,
        start_rss_bytes=start_rss,
        peak_gpu_bytes=summary.peak_gpu_bytes,
    )


@functools.cache
def reference_process_bytes() -> int:
    """Resident size of a fresh reference process once it has imported torch, transformers and peft (measured)."""
    if not reference_available():
        return REFERENCE_PROCESS_FALLBACK_BYTES
    done = subprocess.run(
        [sys.executable, "-m", REFERENCE_MODULE, "--baseline"], capture_output=True, text=True, timeout=300
    )
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return int(json.loads(line[len(RESULT_PREFIX) :])["rss_bytes"])
    return REFERENCE_PROCESS_FALLBACK_BYTES


def reference_available() -> bool:
    return importlib.util.find_spec("peft") is not None and importlib.util.find_spec("transformers") is not None


def measure_reference(base: Path, adapter: Path, dtype: str = "auto") -> Measurement:
    """Run transformers + PEFT in a subprocess and sample its /proc status; phases come from its stdout."""
    label = f"transformers + PEFT ({dtype})"
    with tempfile.TemporaryDirectory(prefix="loractl-memory-ref-") as tmp:
        command = [sys.executable, "-m", REFERENCE_MODULE, str(base), str(adapter), str(Path(tmp) / "out")]
        child = subprocess.Popen(
            [*command, "--dtype", dtype], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        started = time.perf_counter()
        monitor = MemoryMonitor(pid=child.pid)
        stderr: list[str] = []
        result: dict = {}

        def read_stdout() -> None:
            assert child.stdout is not None
            for line in child.stdout:
                if line.startswith(PHASE_PREFIX):
                    monitor.phase = line[len(PHASE_PREFIX) :].strip()
                elif line.startswith(RESULT_PREFIX):
                    result.update(json.loads(line[len(RESULT_PREFIX) :]))

        def read_stderr() -> None:
            assert child.stderr is not None
            stderr.extend(child.stderr)

        readers = [threading.Thread(target=read_stdout, daemon=True), threading.Thread(target=read_stderr, daemon=True)]
        for reader in readers:
            reader.start()
        with monitor:
            child.wait()
        for reader in readers:
            reader.join()
    error = None if child.returncode == 0 else (stderr[-1].strip() if stderr else f"exit {child.returncode}")
    samples = [s for s in monitor.samples if s.anon or s.file]
    if result.get("loaded_dtype"):
        label = f"transformers + PEFT ({result['loaded_dtype']})"
    return Measurement(
        path=label,
        peak_anon_bytes=monitor.peak_anon,
        peak_file_bytes=monitor.peak_file,
        peak_rss_bytes=_peak_rss(samples),
        baseline_anon_bytes=0,
        seconds=time.perf_counter() - started,
        phases=phase_peaks(samples) if samples else [],
        timeline=_thin(samples),
        error=error,
    )


def memory_report(
    base: ResolvedSource,
    adapters: list[AdapterSpec],
    *,
    device: str = "cpu",
    measure: bool = False,
    measure_reference_dtypes: tuple[str, ...] = (),
) -> MemoryReport:
    """Predict (always), then measure loractl's merge and the transformers + PEFT path when asked."""
    prepared = prepare(base, adapters)
    loaded = prepared.adapters
    prediction = predict_plan(prepared.plan, device)
    report = MemoryReport(base=base.ref, adapters=[a.label for a in loaded], device=device, predicted=prediction)
    if measure:
        report.measured["streaming"] = measure_streaming(base, adapters, device)
    if measure_reference_dtypes and len(adapters) == 1:
        own_is_fp32 = len(prediction.paths) == 2
        for dtype in measure_reference_dtypes:
            if dtype == "float32" and own_is_fp32:
                continue  # "auto" already loads this base in float32
            report.measured[f"in_memory_{dtype}"] = measure_reference(base.path, adapters[0].source.path, dtype)
    return report


__all__ = ["MemoryReport", "Prediction", "memory_report", "predict"]
