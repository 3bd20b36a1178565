"""Which device computes, and the switches that make its arithmetic the same as the reference's.

Every command that recomputes a merge (merge and unmerge through `write_plan`, `diff --adapter`) prepares its
device here, so that a check recomputes exactly what the merge it checks computed.
"""

from __future__ import annotations

import torch

from lora_cli.errors import InputError


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA device is available", fix="use --device cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise InputError(f"unknown device {requested!r}", fix="use auto, cpu or cuda") from None
    # With its index, so that it compares equal to the device of the tensors made on it ("cuda" != "cuda:0").
    return torch.device("cuda", torch.cuda.current_device()) if device == torch.device("cuda") else device


def exact_device(requested: str) -> torch.device:
    """`pick_device`, with TF32 off on CUDA for matmul and cuDNN (convolutions) and the peak counter reset.

    TF32 would round the factors' products (a conv LoRA's through cuDNN) differently from the fp32 reference.
    """
    device = pick_device(requested)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.cuda.reset_peak_memory_stats(device)
    return device
