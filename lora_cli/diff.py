"""`loractl diff A B`: compare two checkpoints tensor by tensor, streaming, and say what a merge changed.

Both checkpoints are walked with the shared `Pipeline` (the reader thread loads the pair, the main thread computes
statistics in bounded chunks), so memory stays at a few tensors whatever their size or shard layout. With
adapters, each tensor they edit is recomputed from A with merge's own `apply_edits` and compared with B in ulps:
this is how a pipeline proves which adapter a checkpoint was made from.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from lora_cli.adapters.base import Workspace
from lora_cli.checkpoint_files import read_provenance
from lora_cli.combine import CombineOptions
from lora_cli.combined_merge import combine_transform
from lora_cli.components import COMPONENTS, GROUPS, classify
from lora_cli.device import exact_device
from lora_cli.engine import Transform, apply_edits
from lora_cli.host_buffers import INPUT_BUFFERS, PIPELINE_DEPTH, BufferRing
from lora_cli.io.checkpoint import CheckpointIndex, open_checkpoint
from lora_cli.io.files import SourceFile
from lora_cli.io.prefetch import Prefetcher
from lora_cli.io.safetensors_file import TensorInfo, read_tensor
from lora_cli.memstats import MemoryMonitor
from lora_cli.numerics import CHUNK, coarser, ulp_at, ulps, work_dtype
from lora_cli.plan import PlannedTensor
from lora_cli.resolve import ResolvedSource
from lora_cli.sources import AdapterSpec, prepare
from lora_cli.stream import Pipeline

STATUSES = ("changed", "identical", "only_in_a", "only_in_b", "shape_mismatch", "dtype_mismatch")
DIFFERING = frozenset(STATUSES) - {"identical"}
# Exact singular values below this many rows or columns; a randomized estimate above.
EXACT_SVD_MAX = 64
# Singular values below RANK_RTOL * the largest are taken as numerical noise of the SVD itself.
RANK_RTOL = 1e-4
# A loractl (or PEFT) CPU merge recomputed the same way is bit-identical (0 ulps). Another order of operations
# or device changes the fp32 result by a few fp32 ulps, which after rounding to the stored dtype moves a value by
# at most one step of that dtype, once more at a tie: 2 ulps. A different adapter lands hundreds of ulps away.
DEFAULT_MAX_ULPS = 2.0


@dataclass
class TensorDiff:
    """One tensor's comparison. Numbers are None where they do not apply (missing tensor, shape mismatch)."""

    name: str
    status: str
    layer: int | None
    component: str
    group: str
    dtype_a: str | None
    dtype_b: str | None
    shape_a: list[int] | None
    shape_b: list[int] | None
    max_abs_diff: float | None = None
    rel_frobenius: float | None = None
    frac_differ: float | None = None
    allclose: bool | None = None
    stack: str | None = None  # "encoder" / "decoder" in an encoder-decoder model: each has its own layer N
    cosine: float | None = None
    rank: int | None = None
    # With adapters: whether they edit this tensor, and B's distance from the recomputed merge.
    adapter_edited: bool | None = None
    residual_max_ulps: float | None = None
    residual_exact_share: float | None = None
    adapter_ok: bool | None = None
    expert: int | None = None  # a routed expert stored apart (`mlp.experts.N.*`)

    @property
    def differs(self) -> bool:
        return self.status in DIFFERING


@dataclass
class ComponentSummary:
    """How many tensors of one component (e.g. "self-attention q") differ, over all layers."""

    component: str
    group: str
    tensors: int
    differ: int
    matrices: int
    matrices_differ: int
    max_rel_frobenius: float | None
    ranks: list[int]
    by_status: dict[str, int]


@dataclass
class GroupSummary:
    group: str
    matrices: int
    matrices_differ: int
    vectors: int
    vectors_differ: int


@dataclass
class ExpertSummary:
    """One routed expert of one layer (MoE checkpoints that store experts apart): its tensors and how they differ."""

    layer: int | None
    expert: int
    tensors: int
    differ: int
    components_differ: list[str]
    max_rel_frobenius: float | None


@dataclass
class LayerSummary:
    layer: int | None
    tensors: int
    differ: int
    components_differ: list[str]
    max_rel_frobenius: float | None
    stack: str | None = None  # encoder and decoder layer N are two rows


@dataclass
class AdapterCheck:
    """Is B exactly A merged with the adapters? `verdict`: exact (0 ulps), pass (within the bound) or fail."""

    adapters: list[str]
    max_ulps_bound: float
    verdict: str
    edited: int
    edited_within_bound: int
    max_ulps: float
    exact_share: float
    untouched: int
    untouched_identical: int
    problems: list[str]


@dataclass
class DiffResult:
    a: str
    b: str
    rtol: float
    atol: float
    tensors: list[TensorDiff]
    summary: dict[str, int]
    differ: bool
    components: list[ComponentSummary]
    groups: list[GroupSummary]
    layers: list[LayerSummary]
    seconds: float
    peak_rss_anon_bytes: int
    adapter_check: AdapterCheck | None = None
    provenance_b: dict | None = None
    bytes_read: int = 0
    experts: list[ExpertSummary] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass
class DiffOptions:
    rtol: float = 1e-5
    atol: float = 1e-8
    rank: bool = False
    max_ulps: float = DEFAULT_MAX_ULPS
    device: str = "cpu"


@dataclass
class _Stats:
    max_abs: float = 0.0
    sum_d2: float = 0.0
    sum_a2: float = 0.0
    sum_b2: float = 0.0
    dot: float = 0.0
    unequal: int = 0
    close: bool = True
    noise2: float = 0.0  # sum of squared half-ulps of the compared dtypes: the rounding noise floor


def _chunked_stats(
    a: torch.Tensor,
    b: torch.Tensor,
    compare: torch.dtype | None,
    options: DiffOptions,
    work: torch.dtype,
) -> _Stats:
    """Statistics of A - B over flat chunks; with `compare`, both are first rounded to that dtype.

    The rounding-noise floor (for `--rank` only) is the sum of squared half-ulps of both sides.
    """
    rtol, atol = options.rtol, options.atol
    stats = _Stats()
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    exact = not (a.is_floating_point() and b.is_floating_point())
    tol = (0.0, 0.0) if exact else (rtol, atol)
    noise_dtype = (compare or (a.dtype if a.is_floating_point() else None)) if options.rank else None
    # Both chunks side by side in one buffer: their three dot products (|A|^2, A.B, |B|^2) are then one 2 x 2 Gram
    # matrix, one pass over each side instead of three.
    pair = torch.empty(2, min(CHUNK, flat_a.numel()), dtype=work)
    difference = torch.empty(pair.shape[1], dtype=work)  # one buffer for every chunk's A - B
    for start in range(0, flat_a.numel(), CHUNK):
        ca, cb = flat_a[start : start + CHUNK], flat_b[start : start + CHUNK]
        if compare is not None:
            ca, cb = ca.to(compare), cb.to(compare)
        both = pair[:, : ca.numel()]
        both[0].copy_(ca)
        both[1].copy_(cb)
        ca, cb = both[0], both[1]
        if torch.equal(ca, cb):  # the common case for untouched tensors: no difference to measure
            norm_a = float(torch.dot(ca, ca))
            stats.sum_a2 += norm_a
            stats.sum_b2 += norm_a
            stats.dot += norm_a
        else:
            gram = (both @ both.T).tolist()
            d = torch.sub(ca, cb, out=difference[: ca.numel()])
            largest = _abs_max(d)
            if math.isnan(largest):
                # NaN against NaN (and inf against the same inf) are equal; NaN against a number is infinitely far.
                d = d.masked_fill((ca == cb) | (ca.isnan() & cb.isnan()), 0.0).nan_to_num(
                    nan=math.inf, posinf=math.inf, neginf=-math.inf
                )
                largest = float(d.abs().max())
            stats.max_abs = max(stats.max_abs, largest)
            stats.sum_d2 += float(torch.dot(d, d))
            stats.sum_a2 += gram[0][0]
            stats.sum_b2 += gram[1][1]
            stats.dot += gram[0][1]
            # numpy's count of a float array tests one element at a time (torch.count_nonzero is slower still); its
            # vectorized != 0 and the count of that mask take a third of the time. Both count by value: -0.0 is
            # zero, NaN is not. Single-threaded, so no torch thread has to wake for it.
            stats.unequal += int(np.count_nonzero(d.numpy() != 0))
            # torch.allclose's rule, |A - B| <= atol + rtol * |B|; when even the largest difference is beyond the
            # loosest bound it fails without an elementwise pass (the common case for a changed tensor). Once a
            # chunk has failed, the rest need not be tested.
            if stats.close:
                loosest = _abs_max(cb)
                loosest = math.inf if math.isnan(loosest) else loosest
                if largest > tol[1] + tol[0] * loosest:
                    stats.close = False
                else:
                    # As torch.isclose: an infinity is close only to itself (d == 0 after the NaN masking above);
                    # a finite d means both sides are finite, and inf <= atol + rtol * |inf| must not pass.
                    within = d.abs() <= tol[1] + tol[0] * cb.abs()
                    stats.close = bool(((d == 0) | (within & d.isfinite())).all())
        if noise_dtype is not None:
            half_a, half_b = ulp_at(ca, noise_dtype) / 2, ulp_at(cb, noise_dtype) / 2
            stats.noise2 += float(torch.dot(half_a, half_a) + torch.dot(half_b, half_b))
    return stats


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _find_memcmp() -> Callable[[int, int, int], int] | None:
    """libc's memcmp through ctypes (which releases the GIL during the call), or None where there is no libc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        memcmp = libc.memcmp
    except (OSError, AttributeError):
        return None
    memcmp.restype = ctypes.c_int
    memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return memcmp


_MEMCMP = _find_memcmp()


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes. On the CPU the bytes are compared by memcmp, which stops at the first
    difference (a changed tensor costs nothing) and reads each side once (numpy's array_equal writes a full-size
    mask, then reduces it); torch.equal compares values instead: NaN unequal to itself, -0.0 equal to 0.0."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.device.type != "cpu" or b.device.type != "cpu" or a.element_size() not in _INT_OF_SIZE:
        return bool(torch.equal(a, b)) and not (a.is_floating_point() and bool(a.isnan().any()))
    a, b = a.contiguous(), b.contiguous()
    nbytes = a.numel() * a.element_size()
    if nbytes == 0:
        return True
    if _MEMCMP is not None:
        return _MEMCMP(a.data_ptr(), b.data_ptr(), nbytes) == 0
    as_int = _INT_OF_SIZE[a.element_size()]
    return bool(np.array_equal(a.reshape(-1).view(as_int).numpy(), b.reshape(-1).view(as_int).numpy()))


def _abs_max(x: torch.Tensor) -> float:
    """max |x| from one aminmax pass (x.abs().max() makes an |x| copy first, then a second pass); NaN propagates."""
    low, high = torch.aminmax(x)
    return max(-float(low), float(high)) if not (low.isnan() or high.isnan()) else math.nan


def _extremes(x: torch.Tensor) -> tuple[float, float]:
    """(min, max) of a non-empty tensor; torch has no aminmax for float8, so those are taken a chunk at a time
    in fp32 (exact: every float8 value is an fp32 value)."""
    if x.element_size() == 1 and x.is_floating_point():
        flat = x.reshape(-1)
        pieces = [torch.aminmax(flat[i : i + CHUNK].float()) for i in range(0, flat.numel(), CHUNK)]
        lows, highs = torch.stack([p[0] for p in pieces]), torch.stack([p[1] for p in pieces])
        return float(lows.min()), float(highs.max())
    low, high = torch.aminmax(x.reshape(-1))
    return float(low), float(high)


def difference_rank(d: torch.Tensor, noise: float, rtol: float = RANK_RTOL) -> int:
    """Numerical rank of a 2-D difference: singular values above the rounding-noise floor and `rtol` * the largest.

    A rank-r LoRA merge differs from its base by exactly rank r plus rounding noise spread over every direction;
    the floor (a bound on the noise matrix's largest singular value) keeps the noise from counting.
    """
    rows, cols = d.shape
    smaller = min(rows, cols)
    if smaller == 0:
        return 0
    if smaller <= EXACT_SVD_MAX:
        values = torch.linalg.svdvals(d)
    else:
        # Randomized: q singular values at a fraction of an exact SVD's cost; q doubles while all look like signal.
        q = min(128, smaller)
        while True:
            _, values, _ = torch.svd_lowrank(d, q=q, niter=2)
            threshold = max(rtol * float(values[0]), noise)
            if int((values > threshold).sum()) < q - q // 8 or q == smaller:
                break
            q = min(2 * q, smaller)
    if float(values[0]) == 0.0:
        return 0
    threshold = max(rtol * float(values[0]), noise)
    return int((values > threshold).sum())


def compare_tensors(name: str, a: torch.Tensor | None, b: torch.Tensor | None, options: DiffOptions) -> TensorDiff:
    """Status and statistics of one tensor pair; either side may be missing."""
    place = classify(name)
    record = TensorDiff(
        name=name,
        status="identical",
        layer=place.layer,
        stack=place.stack,
        component=place.component,
        group=place.group,
        expert=place.expert,
        dtype_a=_dtype_name(a),
        dtype_b=_dtype_name(b),
        shape_a=list(a.shape) if a is not None else None,
        shape_b=list(b.shape) if b is not None else None,
    )
    if a is None or b is None:
        record.status = "only_in_b" if a is None else "only_in_a"
        return record
    if a.shape != b.shape:
        record.status = "shape_mismatch"
        return record
    if a.dtype == b.dtype and not options.rank and bits_equal(a, b):
        low, high = _extremes(a) if a.numel() else (0.0, 0.0)  # a.any() would allocate a mask
        if not (math.isnan(low) or math.isnan(high)):
            # Bit-identical and free of NaN (which takes the full path, as before): nothing to measure.
            record.max_abs_diff, record.rel_frobenius, record.frac_differ, record.allclose = 0.0, 0.0, 0.0, True
            record.cosine = 1.0 if low != 0 or high != 0 else None
            return record
    compare = coarser(a.dtype, b.dtype) if a.dtype != b.dtype else None
    work = work_dtype(a.dtype, b.dtype)
    stats = _chunked_stats(a, b, compare, options, work)
    norm_a, norm_b, norm_d = math.sqrt(stats.sum_a2), math.sqrt(stats.sum_b2), math.sqrt(stats.sum_d2)
    record.max_abs_diff = stats.max_abs
    record.rel_frobenius = _finite(norm_d / norm_a if norm_a > 0 else (0.0 if norm_d == 0 else None))
    record.frac_differ = stats.unequal / a.numel() if a.numel() else 0.0
    record.allclose = stats.close
    record.cosine = _finite(stats.dot / (norm_a * norm_b) if norm_a > 0 and norm_b > 0 else None)
    if not stats.close:
        record.status = "changed"
    elif a.dtype != b.dtype:
        record.status = "dtype_mismatch"
    if options.rank and record.status == "changed" and a.dim() == 2:
        d = a.to(compare or work).to(work) - b.to(compare or work).to(work)
        rms_noise = math.sqrt(stats.noise2 / a.numel()) if a.numel() else 0.0
        # The largest singular value of an m x n noise matrix is about rms * (sqrt(m) + sqrt(n)); 2x for margin.
        noise = 2.0 * rms_noise * (math.sqrt(a.shape[0]) + math.sqrt(a.shape[1]))
        record.rank = difference_rank(d, noise)
    return record


def check_against_plan(
    record: TensorDiff,
    planned: PlannedTensor,
    source: torch.Tensor,
    b: torch.Tensor | None,
    device: torch.device,
    bound: float,
    workspace: Workspace,
    transform: Transform = apply_edits,
) -> None:
    """Recompute the merge of one edited tensor and measure B against it in ulps of B's dtype.

    Counted at the larger magnitude of the two values and of the merge's operands (W and the delta): a delta that
    nearly cancels W makes a tiny result whose own ulp would inflate any other order of operations.

    The merge is recomputed as the merge computes it (`apply_edits` with an output buffer: fused W + delta,
    rounded once into B's dtype). When that equals B bit for bit, the residual is 0 ulps everywhere and nothing
    more is measured; only elements that differ are then measured in ulps, against the fp32 result.
    """
    record.adapter_edited = True
    if b is None or tuple(b.shape) != tuple(planned.output.shape):
        record.adapter_ok = False
        return
    rounded = workspace.take("diff_rounded", tuple(b.shape), b.dtype, torch.device("cpu"))  # reused: no page faults
    result = transform(planned, source, device, workspace, rounded)
    fused = result is rounded
    if not fused:
        rounded.copy_(result)  # the one rounding, as the merge does
    if bits_equal(rounded, b):  # the common case: B is exactly what the merge gives, bit for bit
        record.residual_max_ulps, record.residual_exact_share, record.adapter_ok = 0.0, 1.0, True
        return
    expected = (transform(planned, source, device, workspace, None) if fused else result).cpu()
    worst, exact = 0.0, 0
    flat_w, flat_e, flat_r, flat_b = source.reshape(-1), expected.reshape(-1), rounded.reshape(-1), b.reshape(-1)
    same_shape_w = flat_w.numel() == flat_e.numel()
    for start in range(0, flat_e.numel(), CHUNK):
        stop = start + CHUNK
        cb, cr = flat_b[start:stop], flat_r[start:stop]
        differ = (cb != cr).nonzero().squeeze(1)  # equal elements are 0 ulps: measure only the others
        exact += cb.numel() - differ.numel()
        if differ.numel() == 0:
            continue
        e32, cb, cr = flat_e[start:stop][differ], cb[differ], cr[differ]
        if b.is_floating_point():
            at = None
            if same_shape_w:
                w = flat_w[start:stop][differ].to(e32.dtype)
                at = torch.maximum(w.abs(), (e32 - w).abs())
            worst = max(worst, float(ulps(cb, cr, b.dtype, at=at).max()))
        else:
            worst = max(worst, float((cb.double() - cr.double()).abs().max()))
    record.residual_max_ulps = worst
    record.residual_exact_share = exact / flat_e.numel() if flat_e.numel() else 1.0
    record.adapter_ok = worst <= bound


def _finite(value: float | None) -> float | None:
    """None for a number JSON cannot hold (a tensor with inf or NaN has no meaningful norm ratio)."""
    return value if value is not None and math.isfinite(value) else None


def _dtype_name(t: torch.Tensor | None) -> str | None:
    return None if t is None else str(t.dtype).removeprefix("torch.")


def diff(
    a: ResolvedSource,
    b: ResolvedSource,
    options: DiffOptions | None = None,
    adapters: list[AdapterSpec] | None = None,
    progress: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    combine: CombineOptions | None = None,
) -> DiffResult:
    """Compare checkpoints A and B tensor by tensor; with `adapters`, also check that B is A merged with them
    (combined per tensor as `merge --combine` does when `combine` is given)."""
    options = options or DiffOptions()
    planned: dict[str, PlannedTensor] = {}
    transform: Transform = apply_edits
    if adapters:
        combining = combine is not None and (combine.method != "sum" or combine.normalized)
        prepared = prepare(a, [replace(spec, weight=1.0) for spec in adapters] if combining else adapters)
        if combining:
            assert combine is not None
            transform = combine_transform(prepared.adapters, [spec.weight for spec in adapters], combine)
        index_a = prepared.index
        planned = {t.name: t for t in prepared.plan.tensors if t.edits}
    else:
        index_a = open_checkpoint(a.path)
    index_b = open_checkpoint(b.path)
    names = list(index_a.tensors) + [n for n in index_b.tensors if n not in index_a.tensors]
    if on_start is not None:
        on_start(index_a.total_bytes + index_b.total_bytes)
    device = exact_device(options.device)  # as in write_plan: recompute exactly what the merge computed
    records: list[TensorDiff] = []
    workspace = Workspace()  # used by the compute thread only
    started = time.perf_counter()
    # As the merge reads (engine.py): into reused buffers, each handed out again only once the tensor read into it
    # has been compared (`host_buffers.py`). A fresh buffer per tensor was zeroed while holding the GIL the compute
    # thread needs, then faulted in page by page. A source read apart from A's tensor (`_own_source`) has its ring.
    own = {name: _own_source(name, p, index_a) for name, p in planned.items()}
    rings = [
        BufferRing(INPUT_BUFFERS, _largest(infos))
        for infos in (
            index_a.tensors.values(),
            index_b.tensors.values(),
            [p.source for name, p in planned.items() if not own[name]],
        )
    ]
    ring_a, ring_b, ring_source = rings
    # Each pair's bytes asked of the kernel a window ahead of the reader: a cold checkpoint streams (prefetch.py).
    position = {name: i for i, name in enumerate(names)}
    prefetch = Prefetcher([_range(index, name) for name in names for index in (index_a, index_b)])

    def load(name: str) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        prefetch.advance(2 * position[name])
        ta = _read(index_a, name, ring_a)
        tb = _read(index_b, name, ring_b)
        source = None
        if name in planned:
            info = planned[name].source
            source = ta if own[name] else _read_info(info, ring_source)
        return ta, tb, source

    def compute(name: str, loaded: tuple) -> TensorDiff:
        ta, tb, source = loaded
        record = compare_tensors(name, ta, tb, options)
        if adapters:
            if name in planned:
                check_against_plan(record, planned[name], source, tb, device, options.max_ulps, workspace, transform)
            else:
                record.adapter_edited = False
                record.adapter_ok = record.status in ("identical", "dtype_mismatch")
        return record

    def sink(name: str, record: TensorDiff) -> None:
        records.append(record)
        if progress is not None:
            progress(_nbytes(index_a, name) + _nbytes(index_b, name))

    try:
        with MemoryMonitor(keep_timeline=False) as memory:
            Pipeline(load, compute, sink, depth=PIPELINE_DEPTH).run(names)
    finally:
        prefetch.close()
        for ring in rings:
            ring.close()
    # A report over a file rewritten or replaced while it was read would describe neither version (io/files.py).
    index_a.check_unchanged()
    index_b.check_unchanged()
    if adapters:
        prepared.plan.check_inputs_unchanged()
    summary = {status: sum(r.status == status for r in records) for status in STATUSES}
    result = DiffResult(
        a=a.ref,
        b=b.ref,
        rtol=options.rtol,
        atol=options.atol,
        tensors=records,
        summary=summary,
        differ=any(r.differs for r in records),
        components=summarize_components(records),
        groups=summarize_groups(records),
        layers=summarize_layers(records),
        experts=summarize_experts(records),
        seconds=time.perf_counter() - started,
        peak_rss_anon_bytes=memory.peak_anon,
        provenance_b=read_provenance(b.path),
        bytes_read=index_a.total_bytes + index_b.total_bytes,
    )
    if adapters:
        result.adapter_check = _verdict(records, [s.source.ref for s in adapters], set(planned), options.max_ulps)
    return result


def _own_source(name: str, planned: PlannedTensor, index_a: CheckpointIndex) -> bool:
    """Whether the merge's input for `name` is A's tensor of that name (then it is not read twice)."""
    return planned.source.name == name and name in index_a.tensors


def _largest(infos: Iterable[TensorInfo]) -> int:
    """Bytes of the largest tensor read as stored (a quantized weight is dequantized into a tensor of its own)."""
    return max((info.nbytes for info in infos if info.stored), default=0)


def _read(index: CheckpointIndex, name: str, ring: BufferRing) -> torch.Tensor | None:
    info: TensorInfo | None = index.tensors.get(name)
    return _read_info(info, ring) if info is not None else None


def _read_info(info: TensorInfo, ring: BufferRing) -> torch.Tensor:
    return read_tensor(info, into=ring.next(info.nbytes) if info.stored else None)


def _range(index: CheckpointIndex, name: str) -> tuple[SourceFile | Path, int, int]:
    """Where `name`'s bytes lie in `index`, for the prefetcher; an empty range when it is absent or not stored."""
    info = index.tensors.get(name)
    if info is None or not info.stored:
        return index.directory, 0, 0
    return info.handle or info.file, info.offset, info.nbytes


def _nbytes(index: CheckpointIndex, name: str) -> int:
    info = index.tensors.get(name)
    return info.nbytes if info is not None else 0


def _verdict(records: list[TensorDiff], refs: list[str], edited: set[str], bound: float) -> AdapterCheck:
    problems: list[str] = []
    seen = {r.name for r in records}
    problems += [f"{name}: the adapters edit it but B does not have it" for name in sorted(edited - seen)]
    edited_records = [r for r in records if r.adapter_edited]
    untouched = [r for r in records if r.adapter_edited is False]
    for r in edited_records:
        if r.residual_max_ulps is None:
            problems.append(f"{r.name}: missing from B or of another shape than the merge gives")
        elif not r.adapter_ok:
            problems.append(f"{r.name}: {r.residual_max_ulps:.3g} ulps from A merged with the adapters")
    for r in untouched:
        if not r.adapter_ok:
            problems.append(f"{r.name}: the adapters do not touch it but it is {r.status}")
    residuals = [r.residual_max_ulps for r in edited_records if r.residual_max_ulps is not None]
    worst = max(residuals, default=0.0)
    shares = [(r.residual_exact_share or 0.0) for r in edited_records if r.residual_exact_share is not None]
    verdict = "fail" if problems else ("exact" if worst == 0.0 else "pass")
    return AdapterCheck(
        adapters=refs,
        max_ulps_bound=bound,
        verdict=verdict,
        edited=len(edited_records),
        edited_within_bound=sum(bool(r.adapter_ok) for r in edited_records),
        max_ulps=worst,
        exact_share=sum(shares) / len(shares) if shares else 1.0,
        untouched=len(untouched),
        untouched_identical=sum(bool(r.adapter_ok) for r in untouched),
        problems=problems,
    )


def _max(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def summarize_components(records: list[TensorDiff]) -> list[ComponentSummary]:
    out = []
    for component in COMPONENTS:
        members = [r for r in records if r.component == component]
        if not members:
            continue
        matrices = [r for r in members if len(r.shape_a or r.shape_b or []) >= 2]
        out.append(
            ComponentSummary(
                component=component,
                group=members[0].group,
                tensors=len(members),
                differ=sum(r.differs for r in members),
                matrices=len(matrices),
                matrices_differ=sum(r.differs for r in matrices),
                max_rel_frobenius=_max([r.rel_frobenius for r in members if r.differs]),
                ranks=sorted({r.rank for r in members if r.rank is not None}),
                by_status={s: n for s in STATUSES if (n := sum(r.status == s for r in members))},
            )
        )
    return out


def summarize_groups(records: list[TensorDiff]) -> list[GroupSummary]:
    out = []
    for group in GROUPS:
        members = [r for r in records if r.group == group]
        if not members:
            continue
        matrices = [r for r in members if len(r.shape_a or r.shape_b or []) >= 2]
        vectors = [r for r in members if len(r.shape_a or r.shape_b or []) < 2]
        out.append(
            GroupSummary(
                group=group,
                matrices=len(matrices),
                matrices_differ=sum(r.differs for r in matrices),
                vectors=len(vectors),
                vectors_differ=sum(r.differs for r in vectors),
            )
        )
    return out


def summarize_experts(records: list[TensorDiff]) -> list[ExpertSummary]:
    """Expert tensors grouped by layer and expert index, in that order; empty for models without stored experts."""
    groups: dict[tuple[int, int], list[TensorDiff]] = {}
    for r in records:
        if r.expert is not None:
            groups.setdefault((r.layer if r.layer is not None else -1, r.expert), []).append(r)
    out = []
    for (layer, expert), members in sorted(groups.items()):
        differing = [r for r in members if r.differs]
        out.append(
            ExpertSummary(
                layer=None if layer < 0 else layer,
                expert=expert,
                tensors=len(members),
                differ=len(differing),
                components_differ=[c for c in COMPONENTS if any(r.component == c for r in differing)],
                max_rel_frobenius=_max([r.rel_frobenius for r in differing]),
            )
        )
    return out


def summarize_layers(records: list[TensorDiff]) -> list[LayerSummary]:
    """One row per (stack, layer): the encoder's layer 0 and the decoder's layer 0 apart; unlayered tensors last."""
    order = {None: 0, "encoder": 1, "decoder": 2}
    keys = sorted({(r.stack, r.layer) for r in records if r.layer is not None}, key=lambda k: (order[k[0]], k[1]))
    out = []
    for stack, layer in [*keys, (None, None)]:
        if layer is None:
            members = [r for r in records if r.layer is None]
        else:
            members = [r for r in records if r.layer == layer and r.stack == stack]
        if not members:
            continue
        differing = [r for r in members if r.differs]
        out.append(
            LayerSummary(
                stack=stack,
                layer=layer,
                tensors=len(members),
                differ=len(differing),
                components_differ=[c for c in COMPONENTS if any(r.component == c for r in differing)],
                max_rel_frobenius=_max([r.rel_frobenius for r in differing]),
            )
        )
    return out
