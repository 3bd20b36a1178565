"""Which layer and which part of a transformer a tensor name belongs to, from the name alone.

`diff` groups what it finds this way, so a summary can say "self-attention matrices: 128 of 128 differ". The
rules cover Llama/Mistral/Qwen (`model.layers.N.self_attn.q_proj`), GPT-2 (`transformer.h.N.attn.c_attn`),
GPT-NeoX/Falcon/BERT-style names; anything else (a plain state dict's `fc1.weight`) is "other", unlayered.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# `layers.N` (Llama), `h.N` (GPT-2, Falcon), `layer.N` (BERT), `block(s).N` (T5, others).
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
# One routed expert stored apart: `mlp.experts.N.gate_proj` (Qwen-MoE, DeepSeek), `block_sparse_moe.experts.N.w1`.
_EXPERT = re.compile(r"(?:^|\.)experts\.(\d+)(?:\.|$)")
# The router of an MoE block: `mlp.gate` (Qwen-MoE, Mixtral's block_sparse_moe.gate, DeepSeek), `mlp.router`.
_ROUTER_OWNERS = {"mlp", "block_sparse_moe", "feed_forward", "moe"}
_ATTENTION = {"self_attn", "attn", "attention", "self_attention", "selfattention", "cross_attn", "encdecattention"}
_MLP = {"mlp", "feed_forward", "ffn", "feedforward", "experts", "block_sparse_moe", "intermediate"}
_ATTN_PARTS = {
    "q": {"q_proj", "query", "q", "wq", "q_lin"},
    "k": {"k_proj", "key", "k", "wk", "k_lin"},
    "v": {"v_proj", "value", "v", "wv", "v_lin"},
    "o": {"o_proj", "out_proj", "c_proj", "dense", "wo", "o", "out_lin", "output"},
    "qkv": {"c_attn", "qkv_proj", "query_key_value", "wqkv", "qkv", "w_pack"},
}
_MLP_PARTS = {
    "gate": {"gate_proj", "w1", "gate"},
    "up": {"up_proj", "w3", "c_fc", "fc1", "dense_h_to_4h", "fc_in", "wi", "lin1"},
    "down": {"down_proj", "w2", "c_proj", "fc2", "dense_4h_to_h", "fc_out", "wo", "lin2"},
    "gate/up": {"gate_up_proj"},
}
_EMBEDDINGS = {
    "embed_tokens",
    "wte",
    "wpe",
    "word_embeddings",
    "position_embeddings",
    "token_type_embeddings",
    "embed_positions",
    "embed_in",
    "shared",
    "tok_embeddings",
}
_HEADS = {"lm_head", "embed_out", "output_layer"}

GROUPS = ("self-attention", "MLP", "embeddings", "norms", "head", "other")
# Display order of components inside the summary.
COMPONENTS = (
    "self-attention q",
    "self-attention k",
    "self-attention v",
    "self-attention o",
    "self-attention qkv",
    "self-attention other",
    "MLP gate",
    "MLP up",
    "MLP down",
    "MLP gate/up",
    "MLP router",
    "MLP other",
    "embeddings",
    "norms",
    "head",
    "other",
)


@dataclass(frozen=True)
class Placement:
    """Where a tensor sits: its layer index (None outside the repeated blocks), component and group."""

    layer: int | None
    component: str
    group: str
    expert: int | None = None


def _is_norm(part: str) -> bool:
    lowered = part.lower()
    return "norm" in lowered or lowered in {"ln_1", "ln_2", "ln_f", "ln", "final_layer_norm"}


def classify(name: str) -> Placement:
    """Place a tensor by its name; the last matching module segment wins, so `attn.c_proj` is attention's o."""
    match = _LAYER.search(name)
    layer = int(match.group(1)) if match else None
    parts = [p for p in name.split(".") if p not in {"weight", "bias"}]
    lowered = [p.lower() for p in parts]
    if any(_is_norm(p) for p in parts):
        return Placement(layer, "norms", "norms")
    if any(p in _HEADS for p in lowered):
        return Placement(layer, "head", "head")
    if any(p in _EMBEDDINGS for p in lowered):
        return Placement(layer, "embeddings", "embeddings")
    if any(p in _ATTENTION for p in lowered):
        tail = lowered[-1]
        part = next((key for key, names in _ATTN_PARTS.items() if tail in names), "other")
        return Placement(layer, f"self-attention {part}", "self-attention")
    if any(p in _MLP for p in lowered):
        tail = lowered[-1]
        expert = _EXPERT.search(name)
        if tail == "router" or (tail == "gate" and len(lowered) > 1 and lowered[-2] in _ROUTER_OWNERS):
            return Placement(layer, "MLP router", "MLP")
        part = next((key for key, names in _MLP_PARTS.items() if tail in names), "other")
        return Placement(layer, f"MLP {part}", "MLP", int(expert.group(1)) if expert else None)
    return Placement(layer, "other", "other")
