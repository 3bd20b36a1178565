"""Builders for the adapter-type and stacking tests: a tiny conv net, merged-checkpoint reading, and undo."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lora_cli.adapters.base import EditContext
from lora_cli.adapters.loading import load_adapter
from lora_cli.io.checkpoint import open_checkpoint
from lora_cli.plan import build_plan
from tests.builders import load_merged

LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOKENS = torch.tensor([[1, 5, 9, 17, 33, 2, 70, 11], [3, 3, 40, 41, 8, 90, 0, 12]])


class ConvNet(nn.Module):
    """A 3x3 conv, a 1x1 conv and a linear head: every conv shape the conv adapter types treat differently."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(6 * 5 * 5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv2(torch.relu(self.conv1(x)))).flatten(1))


def tiny_convnet(dtype: torch.dtype = torch.float32, seed: int = 0) -> ConvNet:
    torch.manual_seed(seed)
    return ConvNet().to(dtype).eval()


def conv_inputs(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(7)).to(dtype)


def revert_all(base_dir: Path, adapter_dirs: list[Path], merged: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Undo a merge tensor by tensor with each edit's `revert`, last adapter first, in fp32 (as unmerge does).

    Edits that cannot be undone from the merged tensor alone get the base tensor, as `unmerge --base` gives them.
    """
    adapters = [load_adapter(path) for path in adapter_dirs]
    plan = build_plan(open_checkpoint(base_dir), adapters)
    base = load_merged(base_dir)
    restored: dict[str, torch.Tensor] = {}
    for planned in plan.edited:
        tensor = merged[planned.name].float().clone()  # revert may work in place
        for edit in reversed(planned.edits):
            original = base[planned.name].float() if edit.form.revert_needs_base else None
            tensor = edit.revert(tensor, EditContext(edit.adapter, torch.device("cpu")), original)
        restored[planned.name] = tensor
    return restored
