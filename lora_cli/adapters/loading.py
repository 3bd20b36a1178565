"""Read an adapter folder: validate its config, open its weights, and group tensors by the module they adapt."""

from __future__ import annotations

from pathlib import Path

from lora_cli.adapters.base import Adapter, AdapterModule, AdapterWeights
from lora_cli.adapters.checks import check_loaded
from lora_cli.adapters.registry import kind_for
from lora_cli.adapters.weights import PickleWeights, SafetensorsWeights
from lora_cli.errors import InputError
from lora_cli.filenames import ADAPTER_CONFIG, ADAPTER_PICKLE, ADAPTER_SAFETENSORS, CONFIG
from lora_cli.io.checkpoint import read_json

CONFIG_FILE = ADAPTER_CONFIG
PEFT_PREFIXES = ("base_model.model.", "base_model.")
WEIGHT_SUFFIXES = ("weight", "bias")


def parse_adapter_arg(arg: str) -> tuple[str, float]:
    """Split `path@0.7` into the reference and its weight; a plain reference has weight 1."""
    ref, sep, weight = arg.rpartition("@")
    if not sep or not ref:
        return arg, 1.0
    try:
        return ref, float(weight)
    except ValueError:
        # An '@' that is not followed by a number is part of the name.
        return arg, 1.0


def load_adapter(directory: Path, *, ref: str | None = None, weight: float = 1.0, allow_empty: bool = False) -> Adapter:
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError("is not a folder", path=directory, fix="pass an adapter folder or a Hub repo id")
    config_path = directory / CONFIG_FILE
    if not config_path.exists():
        hint = "it looks like a model checkpoint" if (directory / CONFIG).exists() else "is this an adapter?"
        raise InputError(f"has no {CONFIG_FILE} ({hint})", path=directory, fix="pass a PEFT adapter folder")
    config = read_json(config_path)
    if not config.get("peft_type"):
        raise InputError("has no peft_type", path=config_path, fix="this is not a PEFT adapter config; re-save it")
    weights = open_weights(directory)
    adapter = Adapter(
        ref=ref or str(directory), directory=directory, config=config, weights=weights, modules={}, weight=weight
    )
    kind = kind_for(adapter)
    group_keys(adapter, kind.param_roots, getattr(kind, "param_leaves", frozenset()))
    check_loaded(adapter, allow_empty=allow_empty)
    return adapter


def open_weights(directory: Path) -> AdapterWeights:
    safetensors_path = directory / ADAPTER_SAFETENSORS
    if safetensors_path.exists():
        return SafetensorsWeights(safetensors_path)
    bin_path = directory / ADAPTER_PICKLE
    if bin_path.exists():
        return PickleWeights(bin_path)
    raise InputError(
        "has no adapter_model.safetensors (or adapter_model.bin)", path=directory, fix="download the adapter weights"
    )


def _strip_prefix(key: str) -> str:
    for prefix in PEFT_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def group_keys(adapter: Adapter, param_roots: frozenset[str], leaves: frozenset[str] = frozenset()) -> None:
    """Sort every key into a module's parameters, a full-tensor copy, or replaced token rows.

    PEFT's names vary: with or without `base_model.model.`, with or without the adapter name (`lora_A.default.weight`),
    `base_layer` copies of targeted embeddings, `modules_to_save` copies saved under the plain module name.
    `leaves` are second name segments that belong to the parameter (OSF's `osf_svd_params.U_low`), and so do list
    indices (`peanut_encoders.0.weight`): those are never taken for an adapter name.
    """
    modules: dict[str, dict[str, str]] = {}
    for key in adapter.weights.keys():  # noqa: SIM118 - AdapterWeights is not a dict
        parts = _strip_prefix(key).split(".")
        root = next((i for i, part in enumerate(parts) if part in param_roots), None)
        if root is not None:
            # root 0: a tensor the type shares across modules (VeRA's vera_A/vera_B), kept under SHARED_MODULE.
            module, tail = ".".join(parts[:root]), parts[root:]
            if len(tail) > 1 and tail[1] not in WEIGHT_SUFFIXES and tail[1] not in leaves and not tail[1].isdigit():
                tail = [tail[0], *tail[2:]]  # drop the adapter name
            modules.setdefault(module, {})[".".join(tail)] = key
        elif "token_adapter" in parts:
            at = parts.index("token_adapter")
            adapter.token_rows[".".join(parts[:at])] = key
        elif "base_layer" in parts:
            at = parts.index("base_layer")
            adapter.full_tensors[".".join(parts[:at] + parts[at + 1 :])] = key
        elif "modules_to_save" in parts:
            at = parts.index("modules_to_save")
            adapter.full_tensors[".".join(parts[:at] + parts[at + 2 :])] = key
        elif "original_module" in parts:
            continue  # PEFT's untouched copy beside modules_to_save: the base already has it
        else:
            adapter.full_tensors[".".join(parts)] = key
    adapter.modules = {path: AdapterModule(path, params) for path, params in modules.items()}
