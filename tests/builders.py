"""Tiny models and PEFT adapters built inside the tests: the reference every merge is checked against."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

VOCAB = 96


def tiny_llama_config(**overrides: object):
    from transformers import LlamaConfig

    values = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_llama(dtype: torch.dtype = torch.float32, seed: int = 0, **overrides: object) -> nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides)).to(dtype)
    # Random norms too, so that a merge which wrote the wrong tensor cannot pass by accident.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def tiny_gpt2(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    return GPT2LMHeadModel(config).to(dtype).eval()


class MLP(nn.Module):
    """A plain module with no transformers config: the state-dict-only case."""

    def __init__(self, width: int = 24) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, width)
        self.fc2 = nn.Linear(width, width)
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def tiny_mlp(dtype: torch.dtype = torch.float32, seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP().to(dtype).eval()


def save_base(model: nn.Module, path: Path, max_shard_size: str | None = None) -> Path:
    """A transformers model through save_pretrained (sharded when asked); a plain module as a bare state dict."""
    if hasattr(model, "save_pretrained"):
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(path, **kwargs)
    else:
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "model.safetensors")
    return path


def make_adapter(
    base_factory: Callable[[], nn.Module], config, path: Path, *, seed: int = 1, scale: float = 0.5
) -> nn.Module:
    """A PEFT adapter with non-zero weights everywhere (B too), saved to `path`; returns the PeftModel."""
    from peft import get_peft_model

    model = get_peft_model(base_factory(), copy.deepcopy(config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                noise = torch.randn(param.shape, generator=generator, dtype=torch.float32) * scale
                if "magnitude" in name or "modules_to_save" in name or "trainable_tokens" in name:
                    param.add_(noise.to(param.dtype) * 0.1)
                else:
                    param.copy_(noise.to(param.dtype))
    model.save_pretrained(path)
    return model.eval()


def peft_merged_state(base_factory: Callable[[], nn.Module], adapter_path: Path) -> dict[str, torch.Tensor]:
    """The reference: PEFT loads the adapter the usual way and merges it with `merge_and_unload`."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_factory(), adapter_path)
    merged = model.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def peft_logits(base_factory: Callable[[], nn.Module], adapter_path: Path, inputs: torch.Tensor) -> torch.Tensor:
    """Logits of the unmerged PeftModel: what the adapter computes, with no merge involved."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_factory(), adapter_path).eval()
    with torch.no_grad():
        return _logits(model, inputs)


def _logits(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    output = model(inputs)
    return (output.logits if hasattr(output, "logits") else output).float()


def logits_of(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return _logits(model.eval(), inputs)


def load_merged(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a written checkpoint, sharded or not."""
    index = out / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [p.name for p in out.glob("*.safetensors")]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(out / name))
    return state
