"""Does each adapter name the model it is applied to? Stacking is where a wrong pairing slips through.

An adapter's `base_model_name_or_path` is compared with the names the base goes by (the reference given, its
folder, its config's `_name_or_path`) and, for the second and later adapters of a stack, with what the previous
adapter was trained on or called. A mismatch is a message naming both; the CLI warns, or refuses with `--strict`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lora_cli.filenames import ADAPTER_CONFIG
from lora_cli.io.checkpoint import open_checkpoint, read_json
from lora_cli.resolve import ResolvedSource


@dataclass(frozen=True)
class Named:
    """Something applied in a merge and the names it is known by."""

    label: str
    names: frozenset[str]


def _normal(name: str) -> str:
    return name.strip().rstrip("/").lower()


def _aliases(*names: object) -> frozenset[str]:
    """The names themselves and their last path component (a Hub id's model name, a folder's name)."""
    found: set[str] = set()
    for name in names:
        if isinstance(name, str | Path) and str(name).strip():
            text = _normal(str(name))
            found |= {text, text.rsplit("/", 1)[-1]}
    return frozenset(found)


def base_names(ref: str, path: Path, config: dict | None) -> Named:
    """What the base may be called in an adapter config."""
    return Named(ref, _aliases(ref, path, (config or {}).get("_name_or_path")))


def names_base(name: str, base: Named) -> bool:
    """Does `name` (an adapter's `base_model_name_or_path`) name this base?"""
    return bool(_aliases(name) & base.names)


def trained_on(adapter_config: dict) -> str | None:
    value = adapter_config.get("base_model_name_or_path")
    return value if isinstance(value, str) and value.strip() else None


def lineage_messages(base: Named, adapters: list[tuple[str, Path, dict]]) -> list[str]:
    """One message per adapter whose `base_model_name_or_path` names neither the base nor its predecessor.

    `adapters` are (label, folder, adapter config) in the order they are applied.
    """
    messages: list[str] = []
    previous: Named | None = None
    for label, directory, config in adapters:
        named = trained_on(config)
        if named is not None and not names_base(named, base):
            if previous is None:
                messages.append(f"adapter {label} was trained on {named!r}, but the base given is {base.label!r}")
            elif not (_aliases(named) & previous.names):
                messages.append(
                    f"adapter {label} was trained on {named!r}, but it is applied to base {base.label!r} after "
                    f"{previous.label} (fine only if {named!r} is that base with {previous.label} merged in)"
                )
        previous = Named(label, _aliases(label, directory, named))
    return messages


def source_lineage(base: ResolvedSource, adapters: list[ResolvedSource]) -> list[str]:
    """`lineage_messages` for resolved folders: reads the base's config and each `adapter_config.json`."""
    entries = []
    for source in adapters:
        config_path = Path(source.path) / ADAPTER_CONFIG
        config = read_json(config_path) if config_path.exists() else {}
        entries.append((source.ref, Path(source.path), config))
    return lineage_messages(base_names(base.ref, base.path, open_checkpoint(base.path).config()), entries)
