"""Adapter weight files: safetensors read lazily, or a `.bin` read with `torch.load(weights_only=True)` only."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from lora_cli.adapters.base import AdapterWeights, Shape
from lora_cli.errors import InputError
from lora_cli.io.safetensors_file import read_header, read_tensor


class SafetensorsWeights(AdapterWeights):
    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = read_header(path)

    def keys(self) -> list[str]:
        return list(self._file.tensors)

    def shape(self, key: str) -> Shape:
        return self._file.tensors[key].shape

    def dtype(self, key: str) -> torch.dtype:
        return self._file.tensors[key].torch_dtype

    def load(self, key: str) -> torch.Tensor:
        return read_tensor(self._file.tensors[key])


def _reason(exc: Exception) -> str:
    """torch's refusal in a few words: the code the pickle would run, or its first line without terminal escapes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return f"it would call {found.group(1)} when unpickled; loractl loads only tensors from pickles"
    return text.splitlines()[0][:160] if text else type(exc).__name__


class PickleWeights(AdapterWeights):
    """`adapter_model.bin` as older PEFT versions saved it. `weights_only=True` refuses any code in the pickle."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as exc:
            raise InputError(
                f"cannot be read safely as tensors ({_reason(exc)})",
                path=path,
                fix="it is corrupt or holds more than tensors; re-save the adapter as adapter_model.safetensors",
            ) from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise InputError("does not hold a dict of tensors", path=path, fix="re-save the adapter with PEFT")
        self._state: dict[str, torch.Tensor] = state

    def keys(self) -> list[str]:
        return list(self._state)

    def shape(self, key: str) -> Shape:
        return tuple(self._state[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._state[key].dtype

    def load(self, key: str) -> torch.Tensor:
        # A copy: the edits may work in place on what they load, and the mapped original must stay as it is.
        return self._state[key].clone()
