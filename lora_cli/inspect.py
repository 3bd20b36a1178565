"""`loractl inspect`: what an adapter (or a checkpoint) holds, how large its deltas are, and whether it fits a base.

Deltas are described one module at a time, by what each edit says of its form (`TensorEdit.form`). A low-rank
update (s * L @ R) gets its spectrum from QR factors and an r x r SVD, never the full matrix; any other additive
edit gives its dense delta; edits that depend on the weight are measured against the real base with `--base`.
Only one module's delta is ever in memory.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_cli.adapters.base import Adapter, EditContext, EditForm, Shape, TensorEdit
from lora_cli.adapters.common import shared_edits
from lora_cli.adapters.loading import CONFIG_FILE
from lora_cli.adapters.param_lora import ParamLoraEdit
from lora_cli.adapters.registry import kind_for
from lora_cli.checkpoint_files import read_provenance
from lora_cli.components import COMPONENTS, classify
from lora_cli.errors import InputError
from lora_cli.io.checkpoint import CheckpointIndex, open_checkpoint
from lora_cli.io.safetensors_file import read_tensor
from lora_cli.plan import PREFIXES, MergePlan, build_plan, working_dtype
from lora_cli.resolve import ResolvedSource
from lora_cli.sources import AdapterSpec, load_adapters, local_source, prepare

# How `loractl inspect --help` and the README define the effective rank column.
EFFECTIVE_RANK_HELP = (
    "effective rank = exp(entropy of the normalised singular values of the delta) (Roy & Vetterli, 2007): "
    "k equal singular values give k, one dominant direction gives about 1"
)
TYPE_NAMES = {"LORA": "LoRA", "LOHA": "LoHa", "LOKR": "LoKr", "IA3": "IA3", "OFT": "OFT", "BOFT": "BOFT"}
CPU = torch.device("cpu")


@dataclass
class ModuleStats:
    """One edit of the adapter: the base tensor it changes and the size of that change."""

    name: str
    kind: str
    shape: list[int] | None
    rank: int | None
    alpha: float | None
    scale: float | None
    delta_norm: float | None
    effective_rank: float | None
    base_norm: float | None = None
    relative_norm: float | None = None  # |delta|_F / |W|_F
    amplification: float | None = None  # |delta|_F / |U^T W V|_F, U and V the delta's top-rank singular vectors
    note: str | None = None


@dataclass
class ParamCounts:
    """Every element of every adapter tensor, by what it is."""

    factors: int = 0  # the type's own parameters: LoRA's A and B, LoHa's and LoKr's factors, IA3's vectors
    magnitudes: int = 0  # DoRA magnitude vectors
    full_modules: int = 0  # modules_to_save copies and base_layer copies of targeted embeddings
    token_rows: int = 0  # trainable_token_indices rows
    other: int = 0

    @property
    def total(self) -> int:
        return self.factors + self.magnitudes + self.full_modules + self.token_rows + self.other


@dataclass
class FitReport:
    """How the adapter lands on a base: it fits (else `build_plan` raised), and PEFT's trainable share."""

    base: str
    fits: bool
    tensors_edited: int
    base_params: int
    trainable_params: int
    all_params: int
    trainable_percent: float
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def peft_line(self) -> str:
        """The line PEFT's `print_trainable_parameters` prints for this adapter on this base."""
        return (
            f"trainable params: {self.trainable_params:,d} || all params: {self.all_params:,d} || "
            f"trainable%: {self.trainable_percent:.4f}"
        )


@dataclass
class AdapterReport:
    ref: str
    path: str
    peft_type: str
    type_label: str
    peft_version: str | None
    base_model: str | None
    task_type: str | None
    r: object
    alpha: object
    use_rslora: bool
    use_dora: bool
    target_modules: object
    modules_to_save: object
    num_modules: int
    num_params: int
    params: ParamCounts
    size_on_disk: int
    dtypes: dict[str, int]
    modules: list[ModuleStats]
    fit: FitReport | None = None
    kind: str = "adapter"
    effective_rank_definition: str = EFFECTIVE_RANK_HELP


@dataclass
class ComponentStats:
    name: str
    tensors: int
    params: int
    bytes: int


@dataclass
class CheckpointReport:
    ref: str
    path: str
    model_type: str | None
    architectures: list[str]
    dtypes: dict[str, int]
    num_params: int
    num_tensors: int
    shards: list[dict[str, object]]
    components: list[ComponentStats]
    size_on_disk: int
    provenance: dict | None
    kind: str = "checkpoint"


def inspect_ref(
    source: ResolvedSource | Path | str,
    *,
    base: ResolvedSource | Path | str | None = None,
    allow_empty: bool = False,
) -> AdapterReport | CheckpointReport:
    """Describe `source`: an adapter (a folder with an adapter config) or else a model checkpoint.

    Sources are resolved already (the CLI fetches Hub references); a path or string is a local folder.
    """
    source, base = _as_source(source), (None if base is None else _as_source(base))
    if not (source.path / CONFIG_FILE).exists():
        if base is not None:
            raise InputError("is a model checkpoint, not an adapter; --base applies to adapters", path=source.ref)
        return inspect_checkpoint(source.path, ref=source.ref)
    if base is None:
        return _adapter_report(load_adapters([AdapterSpec(source, allow_empty=allow_empty)])[0])
    prepared = prepare(base, [AdapterSpec(source, allow_empty=allow_empty)])
    return _adapter_report(prepared.adapters[0], prepared.plan, base.ref)


def _as_source(source: ResolvedSource | Path | str) -> ResolvedSource:
    if isinstance(source, ResolvedSource):
        return source
    return dataclasses.replace(local_source(source), path=Path(source).expanduser().resolve())


def inspect_adapter(
    adapter: Adapter, base: CheckpointIndex | None = None, base_ref: str | None = None
) -> AdapterReport:
    """Counts, config and per-module delta statistics; with `base`, the fit check and base-relative numbers.

    Raises `AdapterMismatchError` (from `build_plan`) when the adapter does not fit `base`.
    """
    return _adapter_report(adapter, build_plan(base, [adapter]) if base is not None else None, base_ref)


def _adapter_report(adapter: Adapter, plan: MergePlan | None = None, base_ref: str | None = None) -> AdapterReport:
    config = adapter.config
    if plan is not None:
        modules = _stats_with_base(plan)
    else:
        edits = [*shared_edits(adapter), *kind_for(adapter).edits(adapter, lambda name: None)]
        modules = [stats for edit in edits for stats in _expert_stats(edit, None) or [_stats_without_base(edit)]]
    params = count_params(adapter)
    dtypes: Counter[str] = Counter()
    for key, numel in _numels(adapter).items():
        dtypes[str(adapter.weights.dtype(key)).removeprefix("torch.")] += numel
    report = AdapterReport(
        ref=adapter.ref,
        path=str(adapter.directory),
        peft_type=adapter.peft_type,
        type_label=type_label(adapter, modules),
        peft_version=_peft_version(config),
        base_model=config.get("base_model_name_or_path"),
        task_type=config.get("task_type"),
        r=config.get("r"),
        alpha=config.get("lora_alpha", config.get("alpha")),
        use_rslora=bool(config.get("use_rslora")),
        use_dora=bool(config.get("use_dora")),
        target_modules=config.get("target_modules"),
        modules_to_save=config.get("modules_to_save"),
        num_modules=len(adapter.modules),
        num_params=params.total,
        params=params,
        size_on_disk=_folder_bytes(adapter.directory),
        dtypes=dict(dtypes),
        modules=modules,
    )
    if plan is not None:
        report.fit = _fit(plan, adapter, base_ref or str(plan.base.directory))
    return report


def type_label(adapter: Adapter, modules: list[ModuleStats]) -> str:
    """LoRA, DoRA, LoHa, ...: the PEFT type, with DoRA told apart by its edits rather than by the config alone."""
    label = TYPE_NAMES.get(adapter.peft_type, adapter.peft_type)
    if any(m.kind == "dora" for m in modules):
        label = "DoRA"
    extras = [flag for flag, on in (("rsLoRA", adapter.config.get("use_rslora")),) if on]
    if any(m.kind == "lora_bias" for m in modules):
        extras.append("lora_bias")
    return f"{label} ({', '.join(extras)})" if extras else label


def count_params(adapter: Adapter) -> ParamCounts:
    counts = ParamCounts()
    kinds: dict[str, str] = {}
    for module in adapter.modules.values():
        for param, key in module.params.items():
            kinds[key] = "magnitudes" if "magnitude" in param else "factors"
    for key in adapter.full_tensors.values():
        kinds[key] = "full_modules"
    for key in adapter.token_rows.values():
        kinds[key] = "token_rows"
    for key, numel in _numels(adapter).items():
        bucket = kinds.get(key, "other")
        setattr(counts, bucket, getattr(counts, bucket) + numel)
    return counts


def _numels(adapter: Adapter) -> dict[str, int]:
    weights = adapter.weights
    return {key: math.prod(weights.shape(key)) for key in weights.keys()}  # noqa: SIM118 - not a dict


def _peft_version(config: dict) -> str | None:
    version = config.get("peft_version")
    return str(version) if version else None


def _folder_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).iterdir() if p.is_file())


def _module_path(target: str) -> str:
    return target.rsplit(".", 1)[0] if target.endswith((".weight", ".bias")) else target


def _config_rank_alpha(adapter: Adapter, target: str) -> tuple[int | None, float | None]:
    """r and alpha for one module, with `rank_pattern`/`alpha_pattern` applied as PEFT does."""
    config, path = adapter.config, _module_path(target)
    r = adapter.pattern_value("rank_pattern", path, config.get("r"))
    alpha = adapter.pattern_value("alpha_pattern", path, config.get("lora_alpha", config.get("alpha")))
    return (r if isinstance(r, int) else None), (float(alpha) if isinstance(alpha, int | float) else None)


# ---------------------------------------------------------------------------------------------------------------
# Spectra: from factors when the edit is a plain additive low-rank one, from the dense delta otherwise.
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Spectrum:
    """Singular values of a delta, with its top left/right singular vectors when they were computed."""

    values: torch.Tensor
    largest_dim: int
    left: torch.Tensor | None = None
    right: torch.Tensor | None = None

    @property
    def norm(self) -> float:
        return float(torch.linalg.vector_norm(self.values.double()))

    @property
    def effective_rank(self) -> float:
        """exp of the Shannon entropy of the singular values normalised to sum 1 (0 for a zero delta)."""
        s = self.values.double()
        total = s.sum()
        if total <= 0:
            return 0.0
        p = s[s > 0] / total
        return float(torch.exp(-(p * p.log()).sum()))

    def numerical_rank(self) -> int:
        """Singular values above max(s) * max(m, n) * fp32 eps: numpy's `matrix_rank` rule."""
        if self.values.numel() == 0 or float(self.values.max()) == 0.0:
            return 0
        tol = float(self.values.max()) * self.largest_dim * torch.finfo(torch.float32).eps
        return int((self.values > tol).sum())


def low_rank_factors(edit: TensorEdit) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """(L, R, s) with the edit's low-rank update = s * L @ R, where its form names the factors."""
    low_rank = edit.form.low_rank
    if low_rank is None:
        return None
    left, right = low_rank.load(EditContext(edit.adapter, CPU, torch.float64))
    return left, right, low_rank.scale


def factored_spectrum(left: torch.Tensor, right: torch.Tensor, scale: float) -> Spectrum:
    """Spectrum of s * L @ R from QR(L) and QR(R^T): the SVD of an r x r core, never the m x n product."""
    q_left, r_left = torch.linalg.qr(left.double())
    q_right, r_right = torch.linalg.qr(right.double().T)
    u, values, vh = torch.linalg.svd(r_left @ r_right.T * scale)
    order = torch.argsort(values, descending=True)
    largest = max(left.shape[0], right.shape[1])
    return Spectrum(values[order], largest, q_left @ u[:, order], q_right @ vh.T[:, order])


def dense_spectrum(delta: torch.Tensor, vectors: bool) -> Spectrum:
    """Spectrum of a delta held in full (vectors only when the amplification factor needs them)."""
    matrix = delta.reshape(delta.shape[0], -1) if delta.dim() != 1 else delta.reshape(1, -1)
    matrix = matrix.float()
    largest = max(matrix.shape)
    if vectors:
        u, values, vh = torch.linalg.svd(matrix, full_matrices=False)
        return Spectrum(values, largest, u, vh.T)
    return Spectrum(torch.linalg.svdvals(matrix), largest)


def amplification(spectrum: Spectrum, weight: torch.Tensor, rank: int) -> float | None:
    """The LoRA paper's |delta|_F / |U^T W V|_F (section 7.3), U and V the delta's top-`rank` singular vectors."""
    if spectrum.left is None or spectrum.right is None or rank <= 0 or weight.dim() < 2:
        return None
    matrix = weight.reshape(weight.shape[0], -1).float()
    u, v = spectrum.left[:, :rank].float(), spectrum.right[:, :rank].float()
    if u.shape[0] != matrix.shape[0] or v.shape[0] != matrix.shape[1]:
        return None
    projected = float(torch.linalg.matrix_norm(u.T @ matrix @ v))
    return spectrum.norm / projected if projected > 0 else math.inf


def _base_stats(
    edit: TensorEdit,
    target: str,
    shape: Shape | None,
    spectrum: Spectrum | None,
    rank: int | None,
    scale: float | None,
    note: str | None,
) -> ModuleStats:
    _, alpha = _config_rank_alpha(edit.adapter, target)
    return ModuleStats(
        name=target,
        kind=edit.kind,
        shape=list(shape) if shape is not None else None,
        rank=rank if rank is not None else (spectrum.numerical_rank() if spectrum is not None else None),
        alpha=alpha if rank is not None else None,
        scale=scale,
        delta_norm=spectrum.norm if spectrum is not None else None,
        effective_rank=spectrum.effective_rank if spectrum is not None else None,
        note=note,
    )


def _own_rank_scale(edit: TensorEdit) -> tuple[int | None, float | None]:
    """The edit's rank and scale where its form states them, else the config's r (with `rank_pattern`)."""
    form = edit.form
    rank = form.rank
    if rank is None:
        rank, _ = _config_rank_alpha(edit.adapter, edit.target)
    return rank, form.scale


def _shape_without_base(form: EditForm) -> tuple[Shape | None, bool]:
    """The delta's shape when the adapter tells it: (shape, True), or (flat numel, False), or (None, False)."""
    if form.shape is not None:
        return tuple(form.shape), True
    return ((form.numel,), False) if form.numel is not None else (None, False)


def _replacement_note(form: EditForm) -> str:
    return "replaces rows of the base tensor" if form.rows else "replaces the base tensor"


def _stats_without_base(edit: TensorEdit) -> ModuleStats:
    """Delta statistics from the adapter alone: from the factors for LoRA, from apply(0) for other additive edits."""
    form = edit.form
    rank, scale = _own_rank_scale(edit)
    if form.kind == "replacement":
        return _base_stats(edit, edit.target, form.shape, None, None, None, _replacement_note(form))
    found = low_rank_factors(edit)
    if found is not None:
        left, right, s = found
        spectrum = factored_spectrum(left, right, s)
        note = None if form.is_additive else "norm of the low-rank update; the rescale needs --base"
        return _base_stats(edit, edit.target, (left.shape[0], right.shape[1]), spectrum, rank, scale, note)
    shape, two_dimensional = _shape_without_base(form)
    if shape is None:
        return _base_stats(edit, edit.target, None, None, rank, scale, "delta shape unknown without --base")
    if not form.is_additive:
        return _base_stats(edit, edit.target, shape, None, rank, scale, "depends on the base weight: pass --base")
    delta = edit.delta(shape, EditContext(edit.adapter, CPU))
    if not two_dimensional:
        # Only the element count is known: the norm is exact, the spectrum needs the base's shape.
        stats = _base_stats(edit, edit.target, None, None, rank, scale, "effective rank needs --base (shape)")
        stats.delta_norm = float(torch.linalg.vector_norm(delta.double()))
        return stats
    return _base_stats(edit, edit.target, shape, dense_spectrum(delta, vectors=False), rank, scale, None)


def _expert_stats(edit: TensorEdit, weight: torch.Tensor | None, name: str | None = None) -> list[ModuleStats]:
    """One row per expert for LoRA on a fused expert stack (stored whole, or no base given); [] for other edits.

    Stacks stored one tensor per expert come through `ExpertPieceEdit`s, one row each, named after the tensor.
    """
    if not isinstance(edit, ParamLoraEdit) or (edit.num_experts <= 1 and weight is not None):
        return []
    found = edit.expert_factors(EditContext(edit.adapter, CPU, torch.float64))
    if len(found) <= 1:
        return []
    rows = []
    for expert, left, right, scale in found:
        spectrum = factored_spectrum(left, right, scale)
        stats = _base_stats(edit, f"{name or edit.label} expert {expert}", None, spectrum, edit.rank, scale, None)
        alpha = edit.adapter.pattern_value("alpha_pattern", edit.target, edit.adapter.config.get("lora_alpha"))
        stats.alpha = float(alpha) if isinstance(alpha, int | float) else None
        if weight is not None and weight.dim() == 3:
            stats.shape = list(weight.shape[1:])
            stats.base_norm = float(torch.linalg.vector_norm(weight[expert].double()))
            stats.relative_norm = spectrum.norm / stats.base_norm if stats.base_norm > 0 else None
        rows.append(stats)
    return rows


def _stats_with_base(plan: MergePlan) -> list[ModuleStats]:
    """Per edit, the change it makes to the real base tensor (one base tensor and one delta in memory at a time)."""
    out: list[ModuleStats] = []
    for planned in plan.edited:
        weight = read_tensor(planned.source).to(working_dtype(planned.source))
        for edit in planned.edits:
            per_expert = _expert_stats(edit, weight, planned.name)
            if per_expert:
                out.extend(per_expert)
                weight = edit.apply(weight, EditContext(edit.adapter, CPU, weight.dtype))
                continue
            form = edit.form
            replaced = form.kind == "replacement"
            rank, scale = (None, None) if replaced else _own_rank_scale(edit)
            new = edit.apply(weight.clone(), EditContext(edit.adapter, CPU, weight.dtype))  # `apply` may work in place
            stats = _base_stats(edit, planned.name, tuple(weight.shape), None, rank, scale, None)
            base_norm = float(torch.linalg.vector_norm(weight.double()))
            stats.base_norm = base_norm
            spectrum = None
            found = low_rank_factors(edit) if form.is_additive else None
            if found is not None:
                spectrum = factored_spectrum(*found)
            elif new.shape == weight.shape and not replaced:
                spectrum = dense_spectrum(new - weight, vectors=True)
            if spectrum is not None:
                stats.delta_norm, stats.effective_rank = spectrum.norm, spectrum.effective_rank
                stats.rank = stats.rank if stats.rank is not None else spectrum.numerical_rank()
                # Top-r with r the delta's own rank: LoRA's r, or e.g. up to r^2 for LoHa's Hadamard product.
                top = stats.rank if found is not None else spectrum.numerical_rank()
                stats.amplification = amplification(spectrum, weight, top)
            elif new.shape == weight.shape:
                # Replacements: the size of the change, without a spectrum of a full-size matrix.
                stats.delta_norm = float(torch.linalg.vector_norm((new - weight).double()))
            if stats.delta_norm is not None and base_norm > 0:
                stats.relative_norm = stats.delta_norm / base_norm
            if replaced:
                stats.note = _replacement_note(form)
            out.append(stats)
            weight = new
        del weight
    return out


def _fit(plan: MergePlan, adapter: Adapter, base_ref: str) -> FitReport:
    """PEFT's count: every parameter of the PeftModel (base + adapter layers), trainable = the adapter's.

    As `print_trainable_parameters` counts them: `named_parameters()` of the model the adapter was trained on.
    So persistent buffers saved in the checkpoint (Gemma-4's `layer_scalar`) are not parameters, and an adapter
    trained on a bare model (its module names lack the head model's `model.` prefix) does not count the head.
    `base_layer` copies are saved, not trained, so they are not in PEFT's trainable count (nor in its total).
    """
    root = _trained_on(plan, adapter)
    buffers = persistent_buffers(plan.base.directory)
    base_params = sum(
        info.numel
        for name, info in plan.base.tensors.items()
        if name.startswith(root) and name not in buffers  # under a root: the backbone's, so no head
    )
    counts = count_params(adapter)
    base_layer_copies = sum(
        math.prod(adapter.weights.shape(key)) for key in adapter.full_tensors.values() if "base_layer" in key.split(".")
    )
    trainable = counts.total - counts.other - base_layer_copies
    total = base_params + trainable
    return FitReport(
        base=base_ref,
        fits=True,
        tensors_edited=len(plan.edited),
        base_params=base_params,
        trainable_params=trainable,
        all_params=total,
        trainable_percent=100 * trainable / total if total else 0.0,
        warnings=unmatched_targets(adapter.config.get("target_modules"), plan.base.tensors),
    )


def _trained_on(plan: MergePlan, adapter: Adapter) -> str:
    """The prefix of the base model the adapter was trained on: "" for the whole (head) model, or e.g. "model."
    when its module names are the bare backbone's (`layers.0...` against the checkpoint's `model.layers.0...`)."""
    names = set(plan.base.tensors)
    for module in adapter.modules:
        for suffix in (".weight", ".bias", ""):
            if module + suffix in names:
                return ""
            for prefix in PREFIXES:
                if prefix + module + suffix in names:
                    return prefix
    return ""


def persistent_buffers(directory: Path) -> set[str]:
    """Checkpoint names of the persistent buffers of the model in `directory` (in its state dict, not parameters).

    The model is built on the meta device from its config.json (no memory, no weights read); an architecture
    transformers does not know gives an empty set, so every tensor counts as a parameter.
    """
    try:
        import transformers

        config = transformers.AutoConfig.from_pretrained(directory)
        cls = getattr(transformers, (config.architectures or [""])[0], None)
        if cls is None:
            return set()
        with torch.device("meta"):
            model = cls(config)
    except Exception:  # any failure here only loses the refinement, never the report
        return set()
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return {name for name in model.state_dict() if name not in parameters}


def unmatched_targets(targets: object, tensors: dict[str, object]) -> list[str]:
    """`target_modules` entries that match no module of the base, as PEFT matches them: a name matches when it
    equals the module's name or is its last dotted part(s); a string is a regex the whole module name must match.
    An entry that matches nothing adapts nothing (a Phi-1.5 config's `Wqkv` on a model whose layers say `qkv`)."""
    from lora_cli.patterns import full_match

    modules = {name.rsplit(".", 1)[0] for name in tensors if "." in name}
    if isinstance(targets, str):
        if targets == "all-linear":
            return []
        stripped = modules | {m[len(p) :] for m in modules for p in PREFIXES if m.startswith(p)}
        try:
            if any(full_match(targets, m, key="target_modules") for m in stripped):
                return []
        except InputError as exc:
            # Only a warning is at stake: say why it could not be checked (invalid, or too slow to match).
            return [exc.message]
        return [f"target_modules {targets!r} matches no module of the base: nothing it names is adapted"]
    if not isinstance(targets, list | tuple | set):
        return []
    missing = [t for t in targets if isinstance(t, str) and not any(m == t or m.endswith("." + t) for m in modules)]
    if not missing:
        return []
    return [
        f"target_modules {', '.join(map(repr, missing))} match{'es' if len(missing) == 1 else ''} no module of the "
        "base: those layers are not adapted (check the names against the base's modules)"
    ]


# ---------------------------------------------------------------------------------------------------------------
# Model checkpoints
# ---------------------------------------------------------------------------------------------------------------


def component_of(name: str) -> str:
    """The part of the model a tensor belongs to ("self-attention q", "MLP down", "embeddings"), as `diff` groups it."""
    return classify(name).component


def inspect_checkpoint(directory: Path, *, ref: str | None = None) -> CheckpointReport:
    """Dtypes, parameters, shards and tensors per component of a safetensors checkpoint, and loractl provenance."""
    index = open_checkpoint(directory)
    config = index.config() or {}
    dtypes: Counter[str] = Counter()
    components: dict[str, ComponentStats] = {c: ComponentStats(c, 0, 0, 0) for c in COMPONENTS}
    for name, info in index.tensors.items():
        dtypes[str(info.torch_dtype).removeprefix("torch.")] += info.numel
        group = components.setdefault(component_of(name), ComponentStats(component_of(name), 0, 0, 0))
        group.tensors += 1
        group.params += info.numel
        group.bytes += info.nbytes
    shards = [{"file": shard.path.name, "bytes": shard.size, "tensors": len(shard.tensors)} for shard in index.shards]
    return CheckpointReport(
        ref=ref or str(directory),
        path=str(index.directory),
        model_type=config.get("model_type"),
        architectures=list(config.get("architectures") or []),
        dtypes=dict(dtypes),
        num_params=sum(info.numel for info in index.tensors.values()),
        num_tensors=len(index.tensors),
        shards=shards,
        components=[c for c in components.values() if c.tensors],
        size_on_disk=_folder_bytes(index.directory),
        provenance=read_provenance(index.directory),
    )


__all__ = [
    "AdapterReport",
    "CheckpointReport",
    "FitReport",
    "ModuleStats",
    "ParamCounts",
    "inspect_adapter",
    "inspect_checkpoint",
    "inspect_ref",
]
