"""Stream a planned checkpoint to disk: copy untouched tensors as bytes, transform edited ones, write atomically.

`merge` and `unmerge` differ only in the transform they hand to `write_plan` (apply the edits, or revert them).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lora_cli import ties
from lora_cli.adapters.base import EditContext, RowDelta, Workspace
from lora_cli.card import write_card
from lora_cli.checkpoint_files import copy_side_files, update_config, write_provenance
from lora_cli.device import exact_device
from lora_cli.errors import NonFiniteError, OutputError
from lora_cli.filenames import INDEX_FILE
from lora_cli.host_buffers import INPUT_BUFFERS, OUTPUT_BUFFERS, PIPELINE_DEPTH, BufferRing
from lora_cli.io.atomic import atomic_directory, check_output
from lora_cli.io.dtypes import SAFETENSORS_TO_TORCH, dominant_dtype, dtype_name
from lora_cli.io.files import SourceFile
from lora_cli.io.prefetch import Prefetcher
from lora_cli.io.safetensors_file import read_tensor
from lora_cli.io.writer import ShardPlan, ShardWriter, plan_shards, write_index
from lora_cli.memstats import MemoryMonitor
from lora_cli.numerics import all_finite
from lora_cli.plan import MergePlan, PlannedTensor, working_dtype
from lora_cli.quant.base import QuantizedTensor
from lora_cli.sources import Prepared
from lora_cli.stream import Pipeline
from lora_cli.verify import TensorDigests, VerifyReport, verify_shard, verify_written

if TYPE_CHECKING:
    from lora_cli.push import HubPublisher, PushReport

# (planned tensor, input as stored, device, workspace, output buffer) -> the result: either the output buffer,
# already written, or a working-precision tensor the engine rounds into it.
Transform = Callable[[PlannedTensor, torch.Tensor, torch.device, Workspace, torch.Tensor], torch.Tensor]
Progress = Callable[[int], None]
# What the read stage hands the compute stage: a tensor's bytes, a quantized weight's parts, or nothing (a copy).
Loaded = torch.Tensor | dict[str, torch.Tensor] | None


@dataclass
class WriteOptions:
    device: str = "auto"
    dtype: str = "auto"
    max_shard_bytes: int | None = None
    overwrite: bool = False
    check_finite: bool = True
    verify: bool = False  # re-read and checksum every written tensor, and write SHA256SUMS (lora_cli/verify.py)
    publish: HubPublisher | None = None  # `--push-to-hub`: each finished shard is uploaded (lora_cli/push.py)
    command: str | None = None  # the command line, recorded in loractl.json and the model card


@dataclass
class WriteSummary:
    """What a merge or unmerge did; the CLI renders it as a table or JSON."""

    output: str
    operation: str
    tensors_edited: int
    tensors_copied: int
    tensors_total: int
    bytes_written: int
    files: list[str]
    seconds: float
    gb_per_s: float
    peak_rss_anon_bytes: int
    peak_rss_file_bytes: int
    baseline_rss_anon_bytes: int
    peak_gpu_bytes: int | None
    device: str
    dtype: str
    stage_seconds: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    config_changes: dict[str, object] = field(default_factory=dict)
    provenance: dict[str, object] = field(default_factory=dict)
    verification: VerifyReport | None = None
    push: PushReport | None = None


@dataclass
class _CopyJob:
    shard: int
    names: list[str]
    source: SourceFile | Path
    offset: int
    nbytes: int


@dataclass
class _ComputeJob:
    shard: int
    planned: PlannedTensor


def working_copy(
    planned: PlannedTensor, tensor: torch.Tensor, device: torch.device, workspace: Workspace
) -> torch.Tensor:
    """The input in working precision (at least fp32) on the device, in a reused buffer."""
    work = working_dtype(planned.source)
    if tensor.device != device and tensor.dtype != work:
        tensor = upload(tensor, device, workspace)
    return workspace.take("weight", tuple(tensor.shape), work, device).copy_(tensor)


def upload(tensor: torch.Tensor, device: torch.device, workspace: Workspace) -> torch.Tensor:
    """The tensor on `device` as stored, in a reused buffer. A copy that also changes the dtype converts on the
    host first, into a pageable temporary that then uploads slowly: upload as stored, convert on the device."""
    return workspace.take("upload", tuple(tensor.shape), tensor.dtype, device).copy_(tensor)


# Elements per fused chunk and per torch thread (1 MiB of fp32 each): small enough to stay in each core's cache
# between the conversion, the add and the rounding, large enough that each chunk's kernel launches (which wake
# torch's threads, asleep under OMP_WAIT_POLICY=PASSIVE) are amortised. Measured on the 1.1B merge, the adds took
# least time in 0.5-2 M-element chunks on 2 cores (0.8 s; 1.1 s in 256 K, 1.6-1.9 s in 4 M) and 4 M on 16 (0.5 s);
# hence at least 1 M elements, and 256 K more per thread beyond four.
FUSED_CHUNK_ELEMENTS_PER_THREAD = 1 << 18
# A block of rows never has fewer rows than this (unless the tensor has): a one-row product takes the BLAS's
# matrix-vector kernel, whose sums run in another order than the matrix kernel's.
MIN_BLOCK_ROWS = 8
# Working-size tensors alive per edited tensor, beside the rings (`host_buffers.py`); `memory.py` predicts with
# these. On the CPU, a chain of additive edits is fused: when every edit forms its delta by rows
# (`form.row_blocks`, LoRA's linear layers), each block of rows of W + delta is formed in two block-sized buffers
# (`fused_block_elements`) straight into the output buffer, and no weight-sized delta exists; else each edit's
# delta is one working-size tensor and W + delta is formed chunk by chunk into the output buffer. Elsewhere (on a
# GPU, or when the output's shape differs) additive edits are added in place to a working copy of W; any other
# chain runs on a working copy of W, plus the edit's delta and one temporary.
ADDITIVE_WORK_COPIES = 2
UNFUSED_WORK_COPIES = 3


def apply_edits(
    planned: PlannedTensor,
    tensor: torch.Tensor,
    device: torch.device,
    workspace: Workspace,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the tensor through its edits in working precision; rounding to the output dtype happens once.

    Given `out` (the output buffer) and only additive edits, W + delta is formed chunk by chunk straight into
    `out`: the same per-element operations and rounding, without a weight-sized fp32 copy. Else the edits run
    on a full working copy, which is returned for the caller to round.
    """
    work = working_dtype(planned.source)
    if out is not None and out.device.type == "cpu" and tensor.shape == out.shape:
        shape = tuple(tensor.shape)
        if tensor.dim() >= 1 and all(edit.form.is_additive and edit.form.row_blocks for edit in planned.edits):
            stored = planned.source.torch_dtype
            contexts = [EditContext(edit.adapter, device, work, workspace, stored) for edit in planned.edits]
            rows = [edit.row_delta(shape, ctx) for edit, ctx in zip(planned.edits, contexts, strict=True)]
            return _add_rows(tensor, rows, out, work, workspace)
        deltas = _additive_deltas(planned, shape, device, work, workspace)
        if deltas is not None:
            return _add_in_chunks(tensor, deltas, out, work)
    weight = working_copy(planned, tensor, device, workspace)
    for edit in planned.edits:
        weight = edit.apply(weight, EditContext(edit.adapter, device, work, workspace, planned.source.torch_dtype))
    return weight


def fused_block_rows(shape: tuple[int, ...]) -> int:
    """Rows per block of the row-blocked fused add: about FUSED_CHUNK_ELEMENTS_PER_THREAD per torch thread."""
    rows = shape[0] if shape else 1
    per_row = max(math.prod(shape[1:]), 1)
    step = max(FUSED_CHUNK_ELEMENTS_PER_THREAD * max(torch.get_num_threads(), 4) // per_row, MIN_BLOCK_ROWS)
    return min(step, rows)


def fused_block_elements(shape: tuple[int, ...]) -> int:
    """Elements of each block buffer: a block of rows, the last one stretched by up to MIN_BLOCK_ROWS - 1 rows."""
    rows = shape[0] if shape else 1
    return min(fused_block_rows(shape) + MIN_BLOCK_ROWS - 1, rows) * max(math.prod(shape[1:]), 1)


def _add_rows(
    tensor: torch.Tensor, rows: list[RowDelta], out: torch.Tensor, work: torch.dtype, workspace: Workspace
) -> torch.Tensor:
    """out = round(((W + d1) + d2) ...) in `work` precision, each delta formed a block of rows at a time.

    The block's sum starts from d1's rows (d1 + W is W + d1: addition commutes, bit for bit), so one block buffer
    suffices for a single edit and a second takes the other deltas. Both stay in cache from the product to the
    rounding, where a weight-sized delta went out to memory and back three times.
    """
    shape = tuple(tensor.shape)
    total, step = shape[0], fused_block_rows(shape)
    rest = shape[1:]
    size = fused_block_elements(shape)
    first = workspace.take("rows", (size,), work, out.device)
    other = workspace.take("rows2", (size,), work, out.device) if len(rows) > 1 else None
    start = 0
    while start < total:
        stop = min(start + step, total)
        if total - stop < MIN_BLOCK_ROWS:  # no short block at the end: it joins this one
            stop = total
        numel = (stop - start) * max(math.prod(rest), 1)
        block = rows[0](start, stop, first[:numel].view(stop - start, *rest))
        block.add_(tensor[start:stop])
        for more in rows[1:]:
            assert other is not None
            block.add_(more(start, stop, other[:numel].view(stop - start, *rest)))
        out[start:stop].copy_(block)
        start = stop
    return out


def _additive_deltas(
    planned: PlannedTensor, shape: tuple[int, ...], device: torch.device, work: torch.dtype, workspace: Workspace
) -> list[torch.Tensor] | None:
    """Each edit's delta, when every edit of the chain is additive; else None."""
    if not all(edit.form.is_additive for edit in planned.edits):
        return None
    deltas: list[torch.Tensor] = []
    for edit in planned.edits:
        # Each edit may reuse the same scratch buffer: copy the previous delta before the next one overwrites it.
        if deltas:
            deltas[-1] = deltas[-1].clone()
        deltas.append(edit.delta(shape, EditContext(edit.adapter, device, work, workspace, planned.source.torch_dtype)))
    return deltas


def _add_in_chunks(
    tensor: torch.Tensor, deltas: list[torch.Tensor], out: torch.Tensor, work: torch.dtype
) -> torch.Tensor:
    """out = round(((W + d1) + d2) ...) computed in `work` precision, a block of rows at a time."""
    rows = tensor.shape[0] if tensor.dim() else 1
    per_row = max(tensor.numel() // max(rows, 1), 1)
    step = max(FUSED_CHUNK_ELEMENTS_PER_THREAD * max(torch.get_num_threads(), 4) // per_row, 1)
    if tensor.dim() == 0:
        tensor, out, deltas = tensor.view(1), out.view(1), [d.view(1) for d in deltas]
    for start in range(0, rows, step):
        block = tensor[start : start + step].to(work)
        for delta in deltas:
            block.add_(delta[start : start + step])
        out[start : start + step].copy_(block)
    return out


def _jobs(shards: list[ShardPlan], by_name: dict[str, PlannedTensor]) -> list[_CopyJob | _ComputeJob]:
    """One job per edited tensor; untouched tensors stored back to back are copied as one byte range."""
    jobs: list[_CopyJob | _ComputeJob] = []
    for index, shard in enumerate(shards):
        for tensor in shard.tensors:
            planned = by_name[tensor.name]
            if not planned.is_copy:
                jobs.append(_ComputeJob(index, planned))
                continue
            last = jobs[-1] if jobs else None
            source = planned.source
            if (
                isinstance(last, _CopyJob)
                and last.shard == index
                and last.source == (source.handle or source.file)
                and last.offset + last.nbytes == source.offset
            ):
                last.names.append(tensor.name)
                last.nbytes += source.nbytes
            else:
                jobs.append(_CopyJob(index, [tensor.name], source.handle or source.file, source.offset, source.nbytes))
    return jobs


def _input_range(job: _CopyJob | _ComputeJob) -> tuple[SourceFile | Path, int, int]:
    if isinstance(job, _CopyJob):
        return job.source, job.offset, job.nbytes
    source = job.planned.source
    # A dequantized weight (lora_cli/quant) is read from its parts, not from this range: nothing to ask ahead.
    return source.handle or source.file, source.offset, source.nbytes if source.stored else 0


class _ComputeStep:
    """The pipeline's read and compute stages: an edited tensor from its bytes to its output, in reused buffers.

    A copy job passes through both stages untouched; the writer copies its bytes.
    """

    def __init__(
        self, transform: Transform, device: torch.device, options: WriteOptions, jobs: list[_CopyJob | _ComputeJob]
    ) -> None:
        self.transform, self.device, self.options = transform, device, options
        self.workspace = Workspace()
        # Each job's input bytes, asked of the kernel a window ahead of the reader (a cold input streams).
        self.position = {id(job): index for index, job in enumerate(jobs)}
        self.prefetch = Prefetcher([_input_range(job) for job in jobs])
        computed = [job.planned for job in jobs if isinstance(job, _ComputeJob)]
        # Reused host buffers; page-locked for a GPU, so that uploads and downloads run at the bus's speed.
        pinned = device.type == "cuda"
        # A dequantized weight is formed in a tensor of its own, not read into the ring.
        stored = [p.source.nbytes for p in computed if p.source.stored]
        self.inputs = BufferRing(INPUT_BUFFERS, max(stored, default=0), pinned)
        self.outputs = BufferRing(OUTPUT_BUFFERS, max((p.output.nbytes for p in computed), default=0), pinned)

    def load(self, job: _CopyJob | _ComputeJob) -> Loaded:
        self.prefetch.advance(self.position[id(job)])
        if isinstance(job, _CopyJob):
            return None
        source = job.planned.source
        if isinstance(source, QuantizedTensor):
            # Only the stored parts are read ahead; the weight is dequantized when computed, so one dequantized
            # weight (4 bytes an element for FP8) is alive at a time, not one per stage of the pipeline.
            return source.read_parts()
        return read_tensor(source, into=self.inputs.next(source.nbytes) if source.stored else None)

    def compute(self, job: _CopyJob | _ComputeJob, loaded: Loaded) -> torch.Tensor | None:
        if isinstance(job, _CopyJob):
            return None
        planned = job.planned
        source = planned.source
        raw = loaded
        if isinstance(source, QuantizedTensor):
            if source.exact_anywhere and self.device.type != "cpu":
                loaded = {role: part.to(self.device) for role, part in loaded.items()}  # 1 byte an element or less
            raw = source.decode_parts(loaded)
        dtype = SAFETENSORS_TO_TORCH[planned.output.dtype]
        staged = self.outputs.take(planned.output.shape, dtype)
        if not planned.edits:
            return staged.copy_(raw)  # a dtype conversion; a copy, as `raw` goes back to the reader
        # On a GPU, the result is formed in a device buffer and downloaded into the host ring.
        device = self.device
        output = staged if device.type == "cpu" else self.workspace.take("output", planned.output.shape, dtype, device)
        result = self.transform(planned, raw, device, self.workspace, output)
        if result is not output:
            output.copy_(result)  # the one rounding to the output dtype
        if self.options.check_finite and not all_finite(output):
            culprits = ", ".join(sorted({e.adapter.label for e in planned.edits}))
            raise NonFiniteError(
                f"merged tensor {planned.name} holds NaN or Inf",
                path=culprits,
                fix="the adapter is broken for this base (or overflows the output dtype; try --dtype float32)",
            )
        return staged if output is staged else staged.copy_(output)

    def close(self) -> None:
        self.prefetch.close()
        self.inputs.close()
        self.outputs.close()


class _ShardSink:
    """The pipeline's write stage: one `ShardWriter` per output shard, in order.

    A finished shard is synced in the background: the pipeline goes on with the next one meanwhile.
    """

    def __init__(
        self,
        directory: Path,
        shards: list[ShardPlan],
        metadata: dict[str, str],
        digests: TensorDigests | None,
        progress: Progress | None,
        finish_shard: Callable[[ShardWriter], None] = ShardWriter.close,
        one_at_a_time: bool = False,
    ) -> None:
        self.directory, self.shards, self.metadata = directory, shards, metadata
        self.digests, self.progress = digests, progress
        # Run in the background on each finished shard: close (sync), and with --verify or a push, more.
        self.finish_shard = finish_shard
        # Pushing without local copies: the next shard waits for the last one's upload (one shard on disk).
        self.one_at_a_time = one_at_a_time
        self.writers: list[ShardWriter] = []
        self.flusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loractl-fsync")
        self.closing: list[Future[None]] = []

    def write(self, job: _CopyJob | _ComputeJob, result: torch.Tensor | None) -> None:
        writers = self.writers
        if len(writers) <= job.shard:
            if writers:
                self.closing.append(self.flusher.submit(self.finish_shard, writers[-1]))
                if self.one_at_a_time:
                    self.closing[-1].result()
            shard = self.shards[job.shard]
            writers.append(ShardWriter(self.directory / shard.filename, shard, self.metadata, self.digests))
        writer = writers[-1]
        if isinstance(job, _CopyJob):
            written = writer.copy_tensors(job.names, job.source, job.offset, job.nbytes)
        else:
            written = writer.write_tensor(job.planned.name, result)
        if self.progress is not None:
            self.progress(written)

    def finish(self) -> None:
        """Close the last shard and wait until every shard is synced."""
        if self.writers:
            self.closing.append(self.flusher.submit(self.finish_shard, self.writers[-1]))
        for done in self.closing:
            done.result()

    def abort(self) -> None:
        wait(self.closing)  # a shard being synced is closed by its own task, never twice
        for writer in self.writers:
            writer.abort()

    def shutdown(self) -> None:
        self.flusher.shutdown(wait=True)


def write_plan(
    plan: MergePlan,
    out: Path,
    transform: Transform,
    options: WriteOptions,
    *,
    operation: str,
    record: dict[str, object],
    inputs: list[Path],
    progress: Progress | None = None,
) -> WriteSummary:
    """Write every planned tensor to OUT (atomically), transforming the edited ones on the chosen device."""
    out = Path(out).expanduser()
    device = exact_device(options.device)
    source_names = [t.source.file.name for t in plan.tensors]
    shards = plan_shards([t.output for t in plan.tensors], source_names, options.max_shard_bytes)
    publish = options.publish
    one_at_a_time = publish is not None and not publish.keep_local
    needed = max((s.nbytes for s in shards), default=0) if one_at_a_time else plan.output_bytes
    check_output(out, inputs, overwrite=options.overwrite, needed_bytes=needed)
    jobs = _jobs(shards, {t.name: t for t in plan.tensors})
    started = time.perf_counter()
    step = _ComputeStep(transform, device, options, jobs)
    digests = TensorDigests() if options.verify else None
    hashes: dict[str, str] = {}  # SHA-256 of each shard verified as soon as it was closed
    verify_seconds = [0.0]
    planned_headers = dict(_planned_headers(shards))

    def finish_shard(writer: ShardWriter) -> None:
        """Sync a finished shard; with --verify, check it now; when pushing, upload it."""
        writer.close()
        if digests is not None:
            began = time.perf_counter()
            try:
                hashes[writer.path.name] = verify_shard(writer.path, planned_headers[writer.path.name], digests)
            except OutputError:
                plan.check_inputs_unchanged()  # an input changed under the merge explains a mismatch, not the disk
                raise
            verify_seconds[0] += time.perf_counter() - began
        if publish is not None:
            publish.shard_closed(writer.path)

    with MemoryMonitor(keep_timeline=False) as memory, atomic_directory(out, overwrite=options.overwrite) as tmp:
        memory.phase = "write"
        metadata = {"format": "pt", "loractl": operation}
        sink = _ShardSink(tmp, shards, metadata, digests, progress, finish_shard, one_at_a_time)
        pipeline = Pipeline(step.load, step.compute, sink.write, depth=PIPELINE_DEPTH)
        try:
            pipeline.run(jobs)
            sink.finish()
        except BaseException:
            sink.abort()
            raise
        finally:
            sink.shutdown()
            step.close()
        config_changes = _write_side_files(tmp, plan, shards, options)
        seconds = time.perf_counter() - started
        provenance = write_provenance(
            tmp,
            {
                "operation": operation,
                **record,
                "device": str(device),
                "dtype": options.dtype,
                "tensors_edited": [t.name for t in plan.edited],
                **({"command": options.command} if options.command else {}),
                "config_changes": config_changes,
            },
        )
        write_card(tmp, provenance, hashes if digests is not None else None)
        # Inside the atomic block: a checkpoint that fails verification, or read an input that changed, never
        # appears as OUT.
        plan.check_inputs_unchanged()
        verification = verify_written(tmp, _planned_headers(shards), digests, hashes) if digests is not None else None
        if verification is not None:
            verification.seconds += verify_seconds[0]
        # The one commit, from inside the atomic block too: OUT appears only once the Hub holds the checkpoint.
        pushed = publish.commit(tmp) if publish is not None else None
    written = plan.output_bytes
    return WriteSummary(
        output=str(out),
        operation=operation,
        tensors_edited=len(plan.edited),
        tensors_copied=len(plan.tensors) - len(plan.edited),
        tensors_total=len(plan.tensors),
        bytes_written=written,
        files=[s.filename for s in shards],
        seconds=seconds,
        gb_per_s=written / seconds / 1e9 if seconds > 0 else 0.0,
        peak_rss_anon_bytes=memory.peak_anon,
        peak_rss_file_bytes=memory.peak_file,
        baseline_rss_anon_bytes=memory.baseline_anon,
        peak_gpu_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        device=str(device),
        dtype=options.dtype if options.dtype != "auto" else _dominant_dtype(plan),
        stage_seconds={k: round(v, 3) for k, v in pipeline.busy.items()},
        warnings=list(plan.warnings),
        config_changes=config_changes,
        provenance=provenance,
        verification=verification,
        push=pushed,
    )


def _write_side_files(tmp: Path, plan: MergePlan, shards: list[ShardPlan], options: WriteOptions) -> dict[str, object]:
    """Beside the shards: the index, the base's side files and its config, updated; returns the config changes."""
    if len(shards) > 1 or (plan.base.directory / INDEX_FILE).exists():
        write_index(tmp, shards)
    copy_side_files(plan.base.directory, tmp)
    new_dtype = None if options.dtype == "auto" else options.dtype
    quantization = plan.base.quantization
    dequantized = quantization is not None and not plan.keeps_quantization
    if dequantized and new_dtype is None:
        new_dtype = dtype_name(SAFETENSORS_TO_TORCH[quantization.compute_dtype])
    config_changes = update_config(
        tmp, dtype=new_dtype, vocab_size=plan.vocab_size, tie=ties.config_value(plan), dequantized=dequantized
    )
    if plan.retied:
        config_changes["dropped"] = list(plan.retied)
    return config_changes


def write_merge(
    prepared: Prepared,
    out: Path,
    options: WriteOptions,
    progress: Progress | None = None,
    transform: Transform = apply_edits,
) -> WriteSummary:
    """The merge: every edit applied in order, streamed to `out`, with the inputs recorded in its provenance.
    `transform` is the requantizing one for `merge --requantize` (lora_cli/quant/requantize.py)."""
    return write_plan(
        prepared.plan,
        out,
        transform,
        options,
        operation="merge",
        record=prepared.record(),
        inputs=prepared.input_paths,
        progress=progress,
    )


def _planned_headers(shards: list[ShardPlan]) -> list[tuple[str, list[tuple[str, str, tuple[int, ...]]]]]:
    return [(s.filename, [(t.name, t.dtype, tuple(t.shape)) for t in s.tensors]) for s in shards]


def _dominant_dtype(plan: MergePlan) -> str:
    found = dominant_dtype((t.output.dtype, t.output.nbytes) for t in plan.tensors)
    return dtype_name(SAFETENSORS_TO_TORCH[found]) if found else "none"
