"""Trainable Tokens as a PEFT type of its own (`peft/tuners/trainable_tokens/layer.py`): new rows for a few tokens of
an embedding, the same edit as LoRA's `trainable_token_indices`.

PEFT's `merge` copies the saved rows over the rows `token_indices` names (`index_copy`); the originals are kept only
in memory, so undoing it takes them from the base (`unmerge --base`). With tied embeddings PEFT wraps the output head
too and saves its (same) rows again; the checkpoint stores one tensor for both, so those rows land once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lora_cli.adapters.base import Adapter, AdapterKind, AdapterModule, Shape, TensorEdit
from lora_cli.adapters.common import TokenRowsEdit
from lora_cli.adapters.params import require
from lora_cli.errors import InputError


class TrainableTokens(AdapterKind):
    peft_type = "TRAINABLE_TOKENS"
    param_roots = frozenset({"trainable_tokens_delta"})

    def check_adapter(self, adapter: Adapter) -> None:
        indices = adapter.config.get("token_indices")
        if not isinstance(indices, list) or not all(isinstance(i, int) and i >= 0 for i in indices):
            raise InputError(
                f"token_indices must be a list of token ids, got {indices!r}",
                path=adapter.config_path,
            )

    def module_edits(
        self, adapter: Adapter, module: AdapterModule, base_shape: Callable[[str], Shape | None]
    ) -> list[TensorEdit]:
        keys = {other.path: require(adapter, other, "trainable_tokens_delta")[0] for other in adapter.modules.values()}
        key = keys[module.path]
        if base_shape(f"{module.path}.weight") is None and self._tied_copy(adapter, key, keys, base_shape):
            return []
        return [TokenRowsEdit(adapter, f"{module.path}.weight", key, list(adapter.config["token_indices"]))]

    @staticmethod
    def _tied_copy(adapter: Adapter, key: str, keys: dict[str, str], base_shape: Callable[[str], Shape | None]) -> bool:
        """A head tied to the embedding: PEFT saves its rows again, but the checkpoint stores one tensor for both."""
        rows = adapter.weights.load(key)
        return any(
            other != key and base_shape(f"{path}.weight") is not None and torch.equal(adapter.weights.load(other), rows)
            for path, other in keys.items()
        )
