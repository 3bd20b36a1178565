"""README.md for a written checkpoint: a model card that says what it is, made from the provenance record.

The base's own card is not passed off as this checkpoint's: `copy_side_files` keeps it as BASE_README.md (its
license and usage terms still apply), and this card says so. The YAML header follows the Hub's model card
metadata: `base_model` is the base's repo id, and `base_model_relation` is `finetune`, the Hub's relation for a
model whose weights are its base's weights changed by training. The Hub keeps `merge` for a model merged from
several models (its `base_model` then lists them) and `adapter` for a repo holding adapter weights; an adapter
merged into the one base it was trained on is neither.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from lora_cli.filenames import BASE_CARD, CARD, MANIFEST


def write_card(out: Path, provenance: dict[str, object], sha256: dict[str, str] | None = None) -> str:
    """Write OUT/README.md from `provenance` (loractl.json's record) and, when verified, the shards' SHA-256."""
    (out / CARD).write_text(render_card(provenance, sha256, base_card_kept=(out / BASE_CARD).exists()))
    return CARD


def render_card(provenance: dict[str, object], sha256: dict[str, str] | None, *, base_card_kept: bool) -> str:
    operation = str(provenance.get("operation", "merge"))
    base = _record(provenance.get("base"))
    merged = _record(provenance.get("merged"))
    adapters = [_record(a) for a in provenance.get("adapters") or []]  # type: ignore[union-attr]
    # The model this checkpoint's weights derive from: the base of a merge; what an unmerge started from.
    origin = base if operation == "merge" else merged
    # Only a merge names a base_model: an unmerge gives back (about) the base, which is no fine-tune of the merge.
    hub_id = origin.get("ref") if origin.get("commit") and operation == "merge" else None
    kinds = sorted({str(a.get("peft_type", "")).lower() for a in adapters if a.get("peft_type")})

    meta = ["---"]
    if hub_id:
        meta += [f"base_model: {json.dumps(hub_id)}", "base_model_relation: finetune"]
    meta += [
        "library_name: transformers",
        "tags:",
        "- loractl",
        f"- {'merged-adapter' if operation == 'merge' else 'unmerged-adapter'}",
    ]
    meta += [f"- {kind}" for kind in kinds]
    meta.append("---")

    title = "Merged checkpoint" if operation == "merge" else "Checkpoint with adapters taken back out"
    lines = [*meta, "", f"# {title}", ""]
    what = _source_text(origin)
    if operation == "merge":
        lines.append(
            f"{what} with {len(adapters)} PEFT adapter(s) merged into its weights by loractl "
            f"{provenance.get('loractl_version', '')}. It loads with transformers alone; PEFT is not needed."
        )
    else:
        lines.append(
            f"{what} with {len(adapters)} adapter(s) reverted (W = merged - delta) by loractl "
            f"{provenance.get('loractl_version', '')}."
        )
    if not hub_id and operation == "merge":
        lines.append("")
        lines.append("The base was a local folder, so `base_model` is not set: add its Hub id if it has one.")
    lines += ["", "## Adapters", "", "| # | adapter | revision | commit | type | weight |", "|---|---|---|---|---|---|"]
    for i, adapter in enumerate(adapters, 1):
        if adapter.get("commit"):
            revision, commit = adapter.get("revision") or "default branch", _short(adapter["commit"])
        else:
            revision, commit = "local folder", "-"
        kind, weight = adapter.get("peft_type", ""), adapter.get("weight", 1.0)
        lines.append(f"| {i} | `{adapter.get('ref')}` | {revision} | {commit} | {kind} | {weight} |")
    lines += ["", "## How they were combined", ""]
    if operation == "merge":
        lines.append(
            "In one pass, in the order listed: each adapter's delta (as PEFT's merge computes it), scaled by its "
            "weight, is applied to the weights it targets, W' = W + w1 * delta1 + w2 * delta2 ...; for LoRA that is "
            'what PEFT\'s `add_weighted_adapter(combination_type="cat")` gives. Tensors no adapter touches are '
            "copied byte for byte."
        )
    else:
        lines.append("The adapters' edits were reverted in reverse order; untouched tensors are copied byte for byte.")
    edited = provenance.get("tensors_edited") or []
    dtype = provenance.get("dtype", "auto")
    lines += [
        "",
        "## Precision",
        "",
        f"{len(edited)} tensor(s) edited, each computed in float32 (or wider, for float64 weights) from the stored "
        f"values and rounded once to the output dtype ({'as stored in the base' if dtype == 'auto' else dtype}).",
    ]
    changes = provenance.get("config_changes") or {}
    if changes:
        lines.append(f"config.json changes: {json.dumps(changes, sort_keys=True)}.")
    lines += ["", "## Reproduce", "", "```sh", _command(provenance, operation), "```", ""]
    lines.append("`loractl.json` beside this card records the same inputs with their commits and adapter configs.")
    if sha256:
        lines += [
            "",
            "## SHA-256",
            "",
            f"Every shard was read back and checked after writing. `{MANIFEST}` lists every file; check a "
            f"download with `loractl verify DIR` or `sha256sum -c {MANIFEST}`.",
            "",
            "| file | sha256 |",
            "|---|---|",
        ]
        lines += [f"| {name} | `{digest}` |" for name, digest in sorted(sha256.items())]
    lines += ["", "## The base model's card", ""]
    if base_card_kept:
        lines.append(
            f"The base model's own README.md is kept, unchanged, as `{BASE_CARD}`: its license and usage terms "
            "apply to this checkpoint too."
        )
    else:
        lines.append("The base model had no README.md; check its license on its own page.")
    return "\n".join(lines) + "\n"


def _record(value: object) -> dict[str, object]:
    return value if isinstance(value, dict) else {}


def _short(commit: object) -> str:
    return str(commit)[:12] if commit else ""


def _source_text(source: dict[str, object]) -> str:
    ref = source.get("ref") or "a local checkpoint"
    if source.get("commit"):
        return f"[`{ref}`](https://huggingface.co/{ref}) at commit `{_short(source['commit'])}`"
    return f"`{ref}`"


def _command(provenance: dict[str, object], operation: str) -> str:
    """The command given (recorded by the CLI), else one rebuilt from the record with every Hub input pinned."""
    if provenance.get("command"):
        return str(provenance["command"])
    first = _record(provenance.get("base" if operation == "merge" else "merged"))
    adapters = [_record(a) for a in provenance.get("adapters") or []]  # type: ignore[union-attr]
    words = ["loractl", operation, str(first.get("ref"))]
    if first.get("commit"):
        words += ["--revision", str(first["commit"])]
    for adapter in adapters:
        weight = adapter.get("weight", 1.0)
        words.append(f"{adapter.get('ref')}" + ("" if weight == 1.0 else f"@{weight}"))
    commits = {a.get("commit") for a in adapters if a.get("commit")}
    if len(commits) == 1:
        words += ["--adapter-revision", str(commits.pop())]
    words.append("OUT")
    if provenance.get("dtype") not in (None, "auto"):
        words += ["--dtype", str(provenance["dtype"])]
    return shlex.join(words)
