"""Trainable Tokens as a PEFT type of its own (`peft/tuners/trainable_tokens/layer.py`): new rows for a few tokens of
an embedding, the same edit as LoRA's `trainable_token_indices`.

PEFT's `merge` copies the saved rows over the rows `token_indices` names (`index_copy`); the originals are kept only
in memory, so undoing it takes them from the base (`unmerge --base`). With tied embeddings PEFT wraps the output head
too and saves its (same) rows again; the checkpoint stores one tensor for both, so those rows land once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lora_cli.adapters.additive import require
from lora_cli.adapters.base import Adapter, AdapterKind, Shape, TensorEdit, register
from lora_cli.adapters.common import TokenRowsEdit
from lora_cli.errors import InputError


@register
class TrainableTokens(AdapterKind):
    peft_type = "TRAINABLE_TOKENS"
    param_roots = frozenset({"trainable_tokens_delta"})

    def edits(self, adapter: Adapter, base_shape: Callable[[str], Shape | None]) -> list[TensorEdit]:
        indices = adapter.config.get("token_indices")
        if not isinstance(indices, list) or not all(isinstance(i, int) and i >= 0 for i in indices):
            raise InputError(
                f"token_indices must be a list of token ids, got {indices!r}",
                path=adapter.directory / "adapter_config.json",
            )
        keys = {
            module.path: require(adapter, module, "trainable_tokens_delta")[0] for module in adapter.modules.values()
        }
        edits: list[TensorEdit] = []
        for path, key in keys.items():
            if base_shape(f"{path}.weight") is None and self._tied_copy(adapter, key, keys, base_shape):
                continue
            edits.append(TokenRowsEdit(adapter, f"{path}.weight", key, list(indices)))
        return edits

    @staticmethod
    def _tied_copy(adapter: Adapter, key: str, keys: dict[str, str], base_shape: Callable[[str], Shape | None]) -> bool:
        """A head tied to the embedding: PEFT saves its rows again, but the checkpoint stores one tensor for both."""
        rows = adapter.weights.load(key)
        return any(
            other != key and base_shape(f"{path}.weight") is not None and torch.equal(adapter.weights.load(other), rows)
            for path, other in keys.items()
        )
