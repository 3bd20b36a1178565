"""Write a PEFT LoRA adapter (adapter_model.safetensors + adapter_config.json) one tensor at a time.

Extract, resize and combine learn each module's rank only after its SVD, so the safetensors header cannot be
written first. Tensors go to a spill file beside the output as they come; `finish` writes the header and
copies the spill behind it (kernel-side where the OS allows), so memory holds one tensor at most whatever the
adapter's size. The caller writes into a folder from `atomic_directory`, so the adapter appears whole or not
at all.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_cli import __version__
from lora_cli.errors import OutputError
from lora_cli.io.dtypes import TORCH_TO_SAFETENSORS
from lora_cli.io.writer import OutputTensor, ShardPlan, ShardWriter

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
_SPILL = ".adapter.spill"


@dataclass(frozen=True)
class LoraModule:
    """One LoRA module as written: its path in the model, rank and alpha, and whether A/B are embedding-shaped."""

    path: str
    rank: int
    alpha: float
    embedding: bool = False


class AdapterWriter:
    """Collects factors and full tensors in order; `finish` turns them into a PEFT adapter folder."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._spill_path = self.directory / _SPILL
        self._spill = open(self._spill_path, "wb")  # noqa: SIM115 - closed in finish()/abort()
        self._tensors: list[OutputTensor] = []
        self.lora_modules: list[LoraModule] = []
        self.saved_modules: list[str] = []
        self.bias_modules: list[str] = []

    def _add(self, key: str, tensor: torch.Tensor) -> None:
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        try:
            self._spill.write(memoryview(data))
        except OSError as exc:
            raise OutputError(f"write failed: {exc.strerror}", path=self._spill_path) from None
        self._tensors.append(OutputTensor(key, TORCH_TO_SAFETENSORS[tensor.dtype], tuple(tensor.shape)))

    def add_lora(self, module: str, a: torch.Tensor, b: torch.Tensor, *, alpha: float, embedding: bool = False) -> None:
        """A module's factors: A [r, in] and B [out, r] (embeddings: PEFT's lora_embedding_A [r, vocab], B [dim, r])."""
        if embedding:
            self._add(f"{PEFT_PREFIX}{module}.lora_embedding_A", a)
            self._add(f"{PEFT_PREFIX}{module}.lora_embedding_B", b)
        else:
            self._add(f"{PEFT_PREFIX}{module}.lora_A.weight", a)
            self._add(f"{PEFT_PREFIX}{module}.lora_B.weight", b)
        self.lora_modules.append(LoraModule(module, int(a.shape[0]), alpha, embedding))

    def add_lora_bias(self, module: str, bias: torch.Tensor) -> None:
        """PEFT's `lora_bias`: a bias delta carried by lora_B (scaled like the weight delta, so write delta/scale)."""
        self._add(f"{PEFT_PREFIX}{module}.lora_B.bias", bias)
        self.bias_modules.append(module)

    def add_saved(self, tensor_name: str, tensor: torch.Tensor) -> None:
        """A full tensor of a `modules_to_save` module, under the name PEFT saves it with."""
        self._add(f"{PEFT_PREFIX}{tensor_name}", tensor)
        module = tensor_name.rsplit(".", 1)[0]
        if module not in self.saved_modules:
            self.saved_modules.append(module)

    def add_raw(self, key: str, tensor: torch.Tensor) -> None:
        """A tensor under its own key, as another adapter stored it (carried over unchanged)."""
        self._add(key, tensor)

    def has_saved(self, tensor_name: str) -> bool:
        return any(t.name == f"{PEFT_PREFIX}{tensor_name}" for t in self._tensors)

    @property
    def tensor_count(self) -> int:
        return len(self._tensors)

    def finish(self, config: dict[str, object]) -> list[str]:
        """Write adapter_model.safetensors and adapter_config.json; returns the file names."""
        self._spill.flush()
        os.fsync(self._spill.fileno())
        self._spill.close()
        plan = ShardPlan(ADAPTER_WEIGHTS, list(self._tensors))
        writer = ShardWriter(self.directory / ADAPTER_WEIGHTS, plan, {"format": "pt", "loractl": __version__})
        try:
            if self._tensors:
                writer.copy_tensors([t.name for t in self._tensors], self._spill_path, 0, plan.nbytes)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        self._spill_path.unlink()
        (self.directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return [ADAPTER_WEIGHTS, ADAPTER_CONFIG]

    def abort(self) -> None:
        if not self._spill.closed:
            self._spill.close()

    def __enter__(self) -> AdapterWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        # The folder is atomic_directory's to remove; an unfinished writer only closes its spill file.
        if kind is not None:
            self.abort()


def module_names(paths: list[str], all_candidates: list[str]) -> list[str]:
    """`target_modules` for PEFT: the last name parts ("q_proj") when they pick exactly `paths` among
    `all_candidates` (every module of the base that could be targeted), else the full module paths.

    PEFT matches a target by equality or by suffix after a dot, so full paths are exact; suffixes are shorter
    and what vLLM and most tools expect, used whenever they select no module that was not extracted.
    """
    suffixes = sorted({path.rsplit(".", 1)[-1] for path in paths})
    selected = [c for c in all_candidates if c.rsplit(".", 1)[-1] in suffixes]
    if sorted(selected) == sorted(paths):
        return suffixes
    return sorted(paths)


def lora_config(
    modules: list[LoraModule],
    *,
    target_modules: list[str],
    modules_to_save: list[str],
    base_model: str | None,
    lora_bias: bool = False,
    fan_in_fan_out: bool = False,
    task_type: str | None = "CAUSAL_LM",
) -> dict[str, object]:
    """adapter_config.json for `modules`: r and lora_alpha are the most common pair, and `rank_pattern` /
    `alpha_pattern` name (by full path, which PEFT matches exactly) every module that differs from it."""
    pairs = Counter((m.rank, m.alpha) for m in modules)
    rank, alpha = max(pairs, key=lambda pair: (pairs[pair], pair[0])) if pairs else (8, 8)
    rank_pattern = {m.path: m.rank for m in modules if m.rank != rank}
    alpha_pattern = {m.path: _number(m.alpha) for m in modules if m.alpha != alpha}
    return {
        "alpha_pattern": alpha_pattern,
        "base_model_name_or_path": base_model,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "inference_mode": True,
        "init_lora_weights": True,
        "lora_alpha": _number(alpha),
        "lora_bias": lora_bias,
        "lora_dropout": 0.0,
        "modules_to_save": modules_to_save or None,
        "peft_type": "LORA",
        "r": rank,
        "rank_pattern": rank_pattern,
        "target_modules": target_modules,
        "task_type": task_type,
        "use_dora": False,
        "use_rslora": False,
    }


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else float(value)
