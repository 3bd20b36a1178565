"""Adapter weight files: safetensors read lazily, or a `.bin` read with `torch.load(weights_only=True)` only."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch

from lora_cli.adapters.base import AdapterWeights, Shape
from lora_cli.errors import InputError
from lora_cli.io.files import SourceFile
from lora_cli.io.safetensors_file import read_header, read_tensor

ZIP_MAGIC = b"PK\x03\x04"


class SafetensorsWeights(AdapterWeights):
    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = read_header(path)

    def check_unchanged(self) -> None:
        self._file.check_unchanged()

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


def _load_tensors(path: Path, source: SourceFile) -> dict[str, torch.Tensor]:
    """The pickle's tensors by name. The zip format (torch >= 1.6) is mapped; the legacy format, which
    `mmap=True` refuses, is read whole through the open descriptor (old PEFT adapters are small)."""
    zipped = os.pread(source.fd, 4, 0) == ZIP_MAGIC
    try:
        if zipped:
            # torch maps a file by name: on Linux, name our descriptor, so the file checked is the file mapped.
            by_fd = Path(f"/proc/self/fd/{source.fd}")
            mapped = by_fd if by_fd.exists() else path
            state = torch.load(mapped, map_location="cpu", weights_only=True, mmap=True)
        else:
            with os.fdopen(os.dup(source.fd), "rb") as handle:
                state = torch.load(handle, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, TypeError) as exc:
        raise InputError(
            f"cannot be read safely as tensors ({_reason(exc)})",
            path=path,
            fix="it is corrupt or holds more than tensors; re-save the adapter as adapter_model.safetensors",
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError("does not hold a dict of tensors", path=path, fix="re-save the adapter with PEFT")
    strange = [key for key in state if not isinstance(key, str)]
    if strange:
        raise InputError(
            f"names tensors with {type(strange[0]).__name__} keys such as {strange[0]!r}, not parameter names",
            path=path,
            fix="re-save the adapter with PEFT (save_pretrained)",
        )
    return state


class PickleWeights(AdapterWeights):
    """`adapter_model.bin` as older PEFT versions saved it. `weights_only=True` refuses any code in the pickle."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._source = SourceFile(path)
        try:
            self._state = _load_tensors(path, self._source)
        except BaseException:
            self._source.close()
            raise

    def check_unchanged(self) -> None:
        self._source.check_unchanged()

    def keys(self) -> list[str]:
        return list(self._state)

    def shape(self, key: str) -> Shape:
        return tuple(self._state[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._state[key].dtype

    def load(self, key: str) -> torch.Tensor:
        # A copy: the edits may work in place on what they load, and the mapped original must stay as it is.
        return self._state[key].clone()
