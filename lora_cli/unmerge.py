"""`loractl unmerge`: take adapters back out of a merged checkpoint, W = merged - delta, streamed like merge.

The plan is merge's own (`build_plan` on the merged checkpoint) and the writer is `write_plan`; only the
transform differs: each tensor's edits are reverted in reverse order. What the merged file alone cannot give back
(`modules_to_save` copies, trainable tokens, DoRA's norms) is refused, or taken from `--base`.

bf16 and fp16 round-trips are not exact: the merge rounded W + delta, so where the delta is large against W, W's
low bits are gone. The honest bound is about 1 ulp per element counted at the larger magnitude of W and the
merged value; `check_against` measures exactly that.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_cli import ties
from lora_cli.adapters.base import EditContext, TensorEdit, Workspace
from lora_cli.checkpoint_files import read_provenance
from lora_cli.device import pick_device
from lora_cli.engine import Progress, WriteOptions, WriteSummary, working_copy, write_plan
from lora_cli.errors import AdapterMismatchError, InputError, NotRevertibleError
from lora_cli.io.checkpoint import CheckpointIndex, open_checkpoint
from lora_cli.io.dtypes import SAFETENSORS_TO_TORCH, dtype_name
from lora_cli.io.safetensors_file import TensorInfo, read_tensor
from lora_cli.numerics import CHUNK, coarser, ulps
from lora_cli.plan import MergePlan, PlannedTensor, resolve_target
from lora_cli.quant.base import QuantizedTensor
from lora_cli.quant.requantize import requantize_plan
from lora_cli.resolve import ResolvedSource
from lora_cli.sources import AdapterSpec, prepare, source_record
from lora_cli.ties import is_embedding, is_head, is_tied, pair_of

# A head and an embedding that each came back within 1 ulp of the same W differ by at most 2 ulps.
RETIE_ULPS = 2.0


@dataclass
class TensorCheck:
    """One reverted tensor against the original base: worst error and the share of bit-exact elements."""

    name: str
    dtype: str
    max_ulps: float
    exact_share: float
    max_abs: float


@dataclass
class UnmergeSummary(WriteSummary):
    """A `WriteSummary` plus what only an unmerge reports: the expected error and, if asked, the measured one."""

    expected_error: str = ""
    base_used_for: list[str] = field(default_factory=list)
    retied: list[str] = field(default_factory=list)
    check_against: str | None = None
    checks: list[TensorCheck] = field(default_factory=list)
    check_max_ulps: float | None = None
    check_exact_share: float | None = None


def requantized_error(formats: set[str]) -> str:
    """What to expect of `--requantize`: the reverted weights are quantized again, so the format's rounding."""
    return (
        f"each reverted weight is quantized again ({'/'.join(sorted(formats))}, new scales): within the format's "
        "rounding of merged - delta, on top of the rounding the requantized merge made; the base's stored bytes "
        "come back only where the round trip lands on them (compare with `loractl diff BASE OUT`)"
    )


def expected_error(dtypes: set[str]) -> str:
    """What a user should expect of the round trip for the output dtypes of the reverted tensors."""
    names = sorted(dtype_name(SAFETENSORS_TO_TORCH[d]) for d in dtypes)
    if not names:
        return "no tensor was reverted"
    coarse = [n for n in names if n in ("bfloat16", "float16")]
    where = "counted at the larger magnitude of W and the merged value"
    if coarse:
        return (
            f"about 1 ulp of {'/'.join(names)} per element, {where}: the merge rounded W + delta, so where the "
            "delta is large against W, W's low bits are gone (pass --check-against BASE to measure it)"
        )
    return f"within {'/'.join(names)} rounding: at most about 1 ulp per element, {where}"


def _counterpart(name: str, index: CheckpointIndex) -> TensorInfo | None:
    """The tensor of another checkpoint that `name` corresponds to; a head missing there is its tied embedding."""
    return pair_of(name, index, resolve_target(name, set(index.tensors)))


def _check_base_needs(plan: MergePlan, base: CheckpointIndex | None) -> dict[str, TensorInfo]:
    """The base tensor for every target whose edits need it; refuses when there is no base to take it from."""
    needing = [(t, e) for t in plan.tensors for e in t.edits if e.form.revert_needs_base]
    if not needing:
        return {}
    if base is None:
        sample = ", ".join(f"{t.name} ({e.describe()})" for t, e in needing[:3])
        more = f" and {len(needing) - 3} more" if len(needing) > 3 else ""
        raise NotRevertibleError(
            f"{len(needing)} edits cannot be undone from the merged checkpoint alone: {sample}{more}; "
            "modules_to_save and trainable tokens replaced the originals, DoRA needs the base weight's norms",
            path=", ".join(sorted({e.adapter.ref for _, e in needing})),
            fix="pass --base BASE to take the missing values from the base model",
        )
    sources: dict[str, TensorInfo] = {}
    for planned, _ in needing:
        info = _counterpart(planned.name, base)
        if info is None or tuple(info.shape) != tuple(planned.source.shape):
            found = "missing" if info is None else f"of shape {tuple(info.shape)}"
            raise AdapterMismatchError(
                f"{planned.name} is {found} in the base, the merged checkpoint has {tuple(planned.source.shape)}",
                path=base.directory,
                fix="pass the base the merge was made from",
            )
        sources[planned.name] = info
    return sources


def revert_edits(
    planned: PlannedTensor,
    merged: torch.Tensor,
    device: torch.device,
    workspace: Workspace,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """Undo the tensor's edits in reverse order. With `base`, each edit gets the tensor it was applied to."""
    weight = working_copy(planned, merged, device, workspace)
    work = weight.dtype

    def ctx(edit: TensorEdit) -> EditContext:
        return EditContext(edit.adapter, device, work, workspace, planned.source.torch_dtype)

    inputs: list[torch.Tensor | None] = [None] * len(planned.edits)
    if base is not None:
        # The merge applied the chain in working precision from W; replay it to give each edit its own input.
        state = base.to(device=device, dtype=work)
        for i, edit in enumerate(planned.edits):
            inputs[i] = state
            if i + 1 < len(planned.edits):
                state = edit.apply(state.clone(), ctx(edit)).clone()
    for i in reversed(range(len(planned.edits))):
        weight = planned.edits[i].revert(weight, ctx(planned.edits[i]), base=inputs[i])
    return weight


def _measure(name: str, result: torch.Tensor, merged: torch.Tensor, original: torch.Tensor) -> TensorCheck:
    """Error of `result` against the original, in ulps at the larger magnitude of the original and the merged value."""
    dtype = coarser(result.dtype, original.dtype) or result.dtype
    worst = largest = 0.0
    exact = 0
    flat_r, flat_m, flat_o = result.reshape(-1), merged.reshape(-1), original.reshape(-1)
    for start in range(0, flat_r.numel(), CHUNK):
        r, m, o = (t[start : start + CHUNK] for t in (flat_r, flat_m, flat_o))
        worst = max(worst, float(ulps(r, o, dtype, at=m).max()))
        largest = max(largest, float((r.double() - o.double()).abs().max()))
        exact += int((r.to(o.dtype) == o).sum())
    numel = flat_r.numel()
    return TensorCheck(name, dtype_name(result.dtype), worst, exact / numel if numel else 1.0, largest)


def _retie(
    plan: MergePlan,
    merged: ResolvedSource,
    base: CheckpointIndex | None,
    reference: CheckpointIndex | None,
    base_sources: dict[str, TensorInfo],
) -> tuple[list[str], list[str]]:
    """Bring back a head that a merge untied from its embedding, when the two agree again after reverting.

    Returns (heads dropped, warnings). A head the adapters did not edit still holds the base embedding's exact
    bytes, so when it matches, the embedding is taken from it: the tied original comes back bit for bit.
    """
    config = plan.base.config()
    provenance = read_provenance(merged.path) or {}
    untied_by_merge = (provenance.get("config_changes") or {}).get(ties.KEY) is False
    base_tied = any(index is not None and is_tied(index.config()) for index in (base, reference))
    if is_tied(config) or not (untied_by_merge or base_tied):
        return [], []
    by_name = {t.name: t for t in plan.tensors}
    embedding = next((t for t in plan.tensors if is_embedding(t.name)), None)
    heads = [by_name[n] for n in by_name if is_head(n)]
    if embedding is None or len(heads) != 1 or heads[0].source.shape != embedding.source.shape:
        return [], []
    head = heads[0]
    device, workspace = pick_device("cpu"), Workspace()
    outputs: list[torch.Tensor] = []
    magnitude: torch.Tensor | None = None  # the larger |merged| of the two, where the ulps are counted
    for entry in (embedding, head):
        raw = read_tensor(entry.source)
        original = read_tensor(base_sources[entry.name]) if entry.name in base_sources else None
        out = revert_edits(entry, raw, device, workspace, original) if entry.edits else raw
        outputs.append(out.to(device="cpu", dtype=SAFETENSORS_TO_TORCH[entry.output.dtype], copy=True))
        magnitude = raw.abs() if magnitude is None else torch.maximum(magnitude, raw.abs().to(magnitude.dtype))
        del raw, original, out
    worst = _measure(head.name, outputs[0], magnitude, outputs[1]).max_ulps
    del outputs, magnitude
    if worst > RETIE_ULPS:
        return [], [
            f"{head.name} and {embedding.name} still differ after reverting (up to {worst:.3g} ulps): both are kept "
            "and tie_word_embeddings stays false"
        ]
    if not head.edits:
        # The embedding's bytes come from the untouched head: the base's exact values, copied without decoding.
        at_index = plan.tensors.index(embedding)
        plan.tensors[at_index] = PlannedTensor(embedding.name, head.source, [], embedding.output)
    plan.tensors.remove(head)
    return [head.name], []


def unmerge(
    merged: ResolvedSource,
    adapters: list[AdapterSpec],
    out: Path,
    options: WriteOptions | None = None,
    *,
    base: ResolvedSource | None = None,
    check_against: ResolvedSource | None = None,
    progress: Progress | None = None,
    on_plan: Callable[[MergePlan], None] | None = None,
    requantize: bool = False,
) -> UnmergeSummary:
    """Revert `adapters` (given in the order they were merged) from `merged`, writing the result to `out`.

    A quantized `merged` is written dequantized, or with `requantize` in its own format: the reverted weights
    quantized again as `merge --requantize` does (lora_cli/quant/requantize.py), the others copied as stored."""
    options = options or WriteOptions()
    if requantize and check_against is not None:
        raise InputError(
            "--check-against does not combine with --requantize (the error would be the format's rounding)",
            fix="compare the output with the base by `loractl diff BASE OUT`, or unmerge without --requantize",
        )
    # A merged checkpoint that is still tied (PEFT merges into the shared tensor) stays tied when unmerged: the
    # one shared tensor carries every delta, so the head's own edits are reverted on it too.
    prepared = prepare(merged, adapters, dtype=options.dtype, ties="keep")
    plan, loaded = prepared.plan, prepared.adapters
    base_index = open_checkpoint(base.path) if base is not None else None
    base_sources = _check_base_needs(plan, base_index)
    reference = open_checkpoint(check_against.path) if check_against is not None else None
    retied, warnings = _retie(plan, merged, base_index, reference, base_sources)
    plan.warnings.extend(warnings)
    references: dict[str, TensorInfo] = {}
    if reference is not None:
        for planned in plan.edited:
            info = _counterpart(planned.name, reference)
            if info is None or tuple(info.shape) != tuple(planned.output.shape):
                raise AdapterMismatchError(
                    f"{planned.name} is missing or of another shape in the checkpoint to check against",
                    path=reference.directory,
                    fix="pass the base the merge was made from",
                )
            references[planned.name] = info
    checks: list[TensorCheck] = []

    def reverted(planned: PlannedTensor, raw: torch.Tensor, device: torch.device, workspace: Workspace) -> torch.Tensor:
        # Base tensors are read here, in the compute thread: only edited tensors need them.
        original = read_tensor(base_sources[planned.name]) if planned.name in base_sources else None
        return revert_edits(planned, raw, device, workspace, original)

    def transform(
        planned: PlannedTensor, raw: torch.Tensor, device: torch.device, workspace: Workspace, out: torch.Tensor
    ) -> torch.Tensor:
        out.copy_(reverted(planned, raw, device, workspace))  # the one rounding to the output dtype
        if planned.name in references:
            checks.append(_measure(planned.name, out.cpu(), raw, read_tensor(references[planned.name])))
        return out

    edited_dtypes = {t.output.dtype for t in plan.edited}
    formats = {t.source.format for t in plan.edited if isinstance(t.source, QuantizedTensor)}
    if requantize:
        plan, transform = requantize_plan(plan, compute=reverted, command="unmerge")
    if on_plan is not None:
        on_plan(plan)

    record = {**prepared.record("merged"), "reverted_in_order": [a.label for a in reversed(loaded)]}
    if base is not None:
        record["base"] = source_record(base)
    inputs = [*prepared.input_paths, *(s.path for s in (base, check_against) if s is not None)]
    plan.retied = retied
    summary = write_plan(
        plan, out, transform, options, operation="unmerge", record=record, inputs=inputs, progress=progress
    )
    result = UnmergeSummary(
        **{f.name: getattr(summary, f.name) for f in dataclasses.fields(WriteSummary)},
        expected_error=requantized_error(formats) if requantize and formats else expected_error(edited_dtypes),
        base_used_for=sorted(base_sources),
        retied=retied,
    )
    if check_against is not None:
        result.check_against = check_against.ref
        result.checks = checks
        result.check_max_ulps = max((c.max_ulps for c in checks), default=0.0)
        numel = {t.name: math.prod(t.output.shape) for t in plan.edited}
        weights = [numel[c.name] for c in checks]
        total = sum(weights)
        result.check_exact_share = (
            sum(c.exact_share * w for c, w in zip(checks, weights, strict=True)) / total if total else 1.0
        )
    return result
