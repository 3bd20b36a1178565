"""Reading an adapter's config values and module tensors, with the one error each type gives for a bad one."""

from __future__ import annotations

import math

from lora_cli.adapters.base import Adapter, AdapterModule
from lora_cli.errors import InputError, UnsupportedAdapterError


def config_number(
    adapter: Adapter, key: str, default: float, *, pattern: str | None = None, module_path: str = ""
) -> float:
    """A numeric config value, with its per-module override from `pattern` (e.g. `alpha_pattern`), validated."""
    value = adapter.config.get(key, default)
    if value is None:
        value = default
    if pattern is not None:
        value = adapter.pattern_value(pattern, module_path, value)
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise InputError(f"{key} must be a number, got {value!r}", path=adapter.config_path)
    return value


def refuse_weight(adapter: Adapter, name: str, why: str) -> None:
    """`ADAPTER@WEIGHT` scales a delta; types that rotate or multiply the base have none to scale."""
    if adapter.weight != 1.0:
        raise UnsupportedAdapterError(
            f"{why}, so ADAPTER@WEIGHT is not defined for it",
            path=adapter.ref,
            fix=f"pass the {name} adapter without @WEIGHT",
        )


def require(adapter: Adapter, module: AdapterModule, *names: str) -> list[str]:
    """The adapter keys of `names` in this module, in that order; one clear error when any is missing."""
    if not all(module.has(name) for name in names):
        raise missing_params(adapter, module.path, list(module.params), " and ".join(names))
    return [module.params[name] for name in names]


def missing_params(adapter: Adapter, module_path: str, have: list[str], need: str) -> InputError:
    return InputError(
        f"{module_path} has {sorted(have)} but not {need}",
        path=adapter.weights.path,
        fix="the adapter file is incomplete; re-save it",
    )


def mismatched_rank(adapter: Adapter, module_path: str, config_rank: object, tensor: str, stored: int) -> InputError:
    return InputError(
        f"{module_path}: config gives r={config_rank} but its {tensor} has rank {stored}",
        path=adapter.config_path,
        fix="the config and the weights do not belong together; re-save the adapter",
    )
