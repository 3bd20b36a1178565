"""Checks every adapter passes when it is loaded, whatever its type: tensors of a dtype the formulas take, a
`trainable_token_indices` PEFT could have written, and weights for at least one target.

Each failure is an `InputError` naming the file, found before any command reads a value, so that a broken adapter
is one line and exit 2 rather than a crash deep inside a matrix product.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lora_cli.adapters.base import Adapter
from lora_cli.errors import InputError

# The dtypes adapter weights are saved in; every formula computes in fp32 (fp64) from them.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
# Parameters that hold positions or sizes, not values (SHiRA's sparse indices, UniLoRA's and Super-Tuning's saved
# indices, FRoD's sparse positions and size): integers.
INDEX_PARAMS = frozenset(
    {"shira_indices", "unilora_indices_A", "unilora_indices_B", "supertuning_indices", "frod_s_indices", "frod_s_size"}
)


def check_loaded(adapter: Adapter, *, allow_empty: bool = False) -> None:
    """Refuse an adapter whose tensors, token indices or coverage no PEFT version would have saved."""
    _check_dtypes(adapter)
    check_token_indices(adapter.config.get("trainable_token_indices"), adapter.config_path)
    if not allow_empty and not (adapter.modules or adapter.full_tensors or adapter.token_rows):
        raise InputError(
            f"holds no weights for its targets ({len(adapter.weights.keys())} tensors, none of them an adapter's); "
            "some old PEFT versions saved an empty adapter file (a model wrapped twice, or saved before training)",
            path=adapter.weights.path,
            fix="save the adapter again with a current PEFT, or pass --allow-empty to go on with no change",
        )


def _check_dtypes(adapter: Adapter) -> None:
    params = {key: name for module in adapter.modules.values() for name, key in module.params.items()}
    for key in adapter.weights.keys():  # noqa: SIM118 - AdapterWeights is not a dict
        dtype = adapter.weights.dtype(key)
        # By the parameter's name, or by a segment of the key (FRoD saves one tensor per role, `frod_s_indices.<role>`).
        index = params.get(key, "").split(".")[0] in INDEX_PARAMS or not INDEX_PARAMS.isdisjoint(key.split("."))
        allowed = INTEGER_DTYPES if index else FLOAT_DTYPES
        if dtype not in allowed:
            kinds = "integer" if allowed is INTEGER_DTYPES else "float16, bfloat16, float32 or float64"
            raise InputError(
                f"tensor {key} is {str(dtype).removeprefix('torch.')}; adapter weights are {kinds}",
                path=adapter.weights.path,
                fix="the file is corrupt or was converted wrongly; save the adapter again with PEFT",
            )


def check_token_indices(spec: object, path: Path) -> None:
    """`trainable_token_indices`: a list of token ids (the input embedding), or a map of module name to lists."""
    if spec is None:
        return
    for indices in list(spec.values()) if isinstance(spec, dict) else [spec]:
        if not isinstance(indices, list) or not all(type(i) is int and i >= 0 for i in indices):
            raise InputError(
                f"trainable_token_indices must be a list of token ids or a map of module names to such lists, "
                f"got {spec!r:.80}",
                path=path,
                fix="fix trainable_token_indices in the adapter config, or re-save the adapter",
            )


def lora_factor_problem(a_shape: tuple[int, ...], b_shape: tuple[int, ...], layout: str) -> str | None:
    """Why LoRA factors A and B cannot form a delta: their number of dimensions, or ranks that disagree."""
    want = "2-D" if layout in ("linear", "embedding") else "3-D to 5-D"
    ndims_ok = (
        len(a_shape) == len(b_shape) == 2
        if layout in ("linear", "embedding")
        else len(a_shape) == len(b_shape) and 3 <= len(a_shape) <= 5
    )
    if not ndims_ok:
        return f"factors of shapes {a_shape} and {b_shape} are not both {want}"
    # A convolution's lora_B may be grouped as its base is (PEFT: in_channels r, groups g, so r / g per group).
    grouped = layout == "conv" and b_shape[1] > 0 and a_shape[0] % b_shape[1] == 0
    if a_shape[0] != b_shape[1] and not grouped:
        return f"lora_A has rank {a_shape[0]} but lora_B takes {b_shape[1]} (shapes {a_shape} and {b_shape})"
    return None
