"""A self-contained example: a tiny Llama and a LoRA adapter made on the spot, merged, and checked.

Needs no network and no PEFT: the check runs the base model with the LoRA applied at run time (forward
hooks adding x A^T B^T * scaling) and compares its logits with the merged checkpoint's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from lora_cli.engine import Progress, WriteOptions, WriteSummary, write_merge
from lora_cli.filenames import ADAPTER_CONFIG, ADAPTER_SAFETENSORS
from lora_cli.sources import AdapterSpec, local_source, prepare

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, ALPHA = 8, 16


@dataclass
class DemoResult:
    base: str
    adapter: str
    merged: str
    summary: WriteSummary
    max_logit_difference: float
    logits_match: bool


def build_base(path: Path, seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    return model


def build_adapter(
    model: torch.nn.Module, path: Path, base: Path, seed: int = 1
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A LoRA in PEFT's file format on every linear layer of every block; B is non-zero so the merge matters."""
    generator = torch.Generator().manual_seed(seed)
    factors, tensors = {}, {}
    for name, module in model.named_modules():
        if name.split(".")[-1] in TARGETS:
            a = torch.randn(RANK, module.in_features, generator=generator) * 0.05
            b = torch.randn(module.out_features, RANK, generator=generator) * 0.05
            factors[name] = (a, b)
            tensors[f"base_model.model.{name}.lora_A.weight"] = a
            tensors[f"base_model.model.{name}.lora_B.weight"] = b
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / ADAPTER_SAFETENSORS)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": RANK,
        "lora_alpha": ALPHA,
        "target_modules": list(TARGETS),
        "base_model_name_or_path": str(base),
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "bias": "none",
    }
    (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    return factors


def logits_with_runtime_lora(model: torch.nn.Module, factors: dict, inputs: torch.Tensor) -> torch.Tensor:
    """What the adapter computes without merging: each target adds (x A^T B^T) * alpha / r to its output."""
    scaling = ALPHA / RANK
    modules = dict(model.named_modules())
    hooks = [
        modules[name].register_forward_hook(lambda _m, args, out, a=a, b=b: out + (args[0] @ a.T @ b.T) * scaling)
        for name, (a, b) in factors.items()
    ]
    try:
        with torch.no_grad():
            return model(inputs).logits
    finally:
        for hook in hooks:
            hook.remove()


def run_demo(workdir: Path, options: WriteOptions | None = None, progress: Progress | None = None) -> DemoResult:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    # transformers draws its own bars while saving and loading; ours is the one that matters here.
    transformers_logging.disable_progress_bar()

    base_dir, adapter_dir, merged_dir = workdir / "base", workdir / "adapter", workdir / "merged"
    model = build_base(base_dir)
    factors = build_adapter(model, adapter_dir, base_dir)
    options = options or WriteOptions()
    prepared = prepare(local_source(base_dir), [AdapterSpec(local_source(adapter_dir))], dtype=options.dtype)
    summary = write_merge(prepared, merged_dir, options, progress)
    inputs = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    expected = logits_with_runtime_lora(model, factors, inputs)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    with torch.no_grad():
        got = merged(inputs).logits
    difference = float((got - expected).abs().max())
    return DemoResult(
        base=str(base_dir),
        adapter=str(adapter_dir),
        merged=str(merged_dir),
        summary=summary,
        max_logit_difference=difference,
        # fp32 logits through 4 layers: different summation order only, far below any real change.
        logits_match=difference < 1e-4,
    )
