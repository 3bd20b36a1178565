"""LN Tuning as PEFT defines it (`peft/tuners/ln_tuning/layer.py`): a trained copy of each targeted (norm) layer.

PEFT's merge swaps the copy in, so every saved tensor replaces the base tensor of the same name; undoing that
needs the original, which only the base has.
"""

from __future__ import annotations

from collections.abc import Callable

from lora_cli.adapters.base import Adapter, AdapterKind, AdapterModule, Shape, TensorEdit
from lora_cli.adapters.common import FullTensorEdit


class LnTuning(AdapterKind):
    peft_type = "LN_TUNING"
    param_roots = frozenset({"ln_tuning_layers"})

    def module_edits(
        self, adapter: Adapter, module: AdapterModule, base_shape: Callable[[str], Shape | None]
    ) -> list[TensorEdit]:
        return [
            FullTensorEdit(adapter, f"{module.path}.{param.removeprefix('ln_tuning_layers.')}", key, "modules_to_save")
            for param, key in module.params.items()
        ]
