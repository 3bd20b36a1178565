"""What kind of layer owns each weight: linear, transformers' Conv1D (stored transposed), embedding, or other.

A LoRA written for a module must match its layer type (PEFT transposes B @ A for Conv1D and stores embedding
factors the other way round), and tensor names alone do not say which is which. With a config.json the model is
built on the meta device (no memory, no weights) and its modules asked; without one (a bare state dict), 2-D
weights are taken as linear layers unless their name says embedding.
"""

from __future__ import annotations

import contextlib
import io
import logging

import torch
from torch import nn

EMBEDDING_NAMES = ("embed_tokens", "wte", "wpe", "word_embeddings", "embed_in", "embed_out", "lm_head", "shared")


def module_kinds(config: dict | None, tensor_names: list[str]) -> dict[str, str]:
    """Module path -> "linear", "conv1d", "embedding" or "other" for every module owning one of the tensors."""
    modules = {name.rsplit(".", 1)[0] for name in tensor_names if "." in name}
    found = _from_meta_model(config) if config else None
    kinds: dict[str, str] = {}
    for module in modules:
        if found is not None and module in found:
            kinds[module] = found[module]
        elif module.rsplit(".", 1)[-1] in EMBEDDING_NAMES:
            kinds[module] = "embedding"
        else:
            kinds[module] = "linear"
    return kinds


def _from_meta_model(config: dict) -> dict[str, str] | None:
    """Build the architecture named in config.json on the meta device and classify its modules; None if it
    cannot be built here (unknown or remote-code architecture): the name rule applies then."""
    architectures = config.get("architectures") or []
    if not architectures or "model_type" not in config:
        return None
    try:
        import transformers
        from transformers.pytorch_utils import Conv1D

        model_class = getattr(transformers, str(architectures[0]), None)
        if model_class is None:
            return None
        values = {k: v for k, v in config.items() if k != "model_type"}
        quiet = logging.getLogger("transformers")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            with contextlib.redirect_stderr(io.StringIO()), torch.device("meta"):
                model_config = transformers.AutoConfig.for_model(config["model_type"], **values)
                model = model_class(model_config)
        finally:
            quiet.setLevel(level)
    except Exception:  # any failure to build only loses the better classification
        return None
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    kinds: dict[str, str] = {}
    for path, module in model.named_modules():
        if isinstance(module, nn.Embedding) or (output is not None and module is output):
            kinds[path] = "embedding"
        elif isinstance(module, Conv1D):
            kinds[path] = "conv1d"
        elif isinstance(module, nn.Linear):
            kinds[path] = "linear"
        elif path:
            kinds[path] = "other"
    return kinds
