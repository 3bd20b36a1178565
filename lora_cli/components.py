"""Which layer and which part of a transformer a tensor name belongs to, from the name alone.

`diff` groups what it finds this way, so a summary can say "self-attention matrices: 128 of 128 differ". The
rules cover Llama/Mistral/Qwen (`model.layers.N.self_attn.q_proj`), GPT-2 (`transformer.h.N.attn.c_attn`),
GPT-NeoX/Falcon/BERT-style names, and encoder-decoder models: T5 (`decoder.block.N.layer.1.EncDecAttention.q`,
`DenseReluDense.wi_0`) and Whisper/BART (`model.decoder.layers.N.encoder_attn.q_proj`, `fc1`), whose encoder and
decoder each have their own layer N (the `stack`) and whose cross-attention is a component of its own. Anything
else (a plain state dict's `fc1.weight`) is "other", unlayered.
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
_ATTENTION = {"self_attn", "attn", "attention", "self_attention", "selfattention"}
# Attention over the other stack's output (T5's EncDecAttention, Whisper's and BART's encoder_attn).
_CROSS_ATTENTION = {"cross_attn", "encdecattention", "encoder_attn", "crossattention", "cross_attention"}
_MLP = {"mlp", "feed_forward", "ffn", "feedforward", "experts", "block_sparse_moe", "intermediate", "densereludense"}
# MLP projections that sit directly in a layer, with no MLP module around them (Whisper, BART: layers.N.fc1).
_BARE_MLP = {"fc1", "fc2"}
_STACKS = ("encoder", "decoder")
_ATTN_PARTS = {
    "q": {"q_proj", "query", "q", "wq", "q_lin"},
    "k": {"k_proj", "key", "k", "wk", "k_lin"},
    "v": {"v_proj", "value", "v", "wv", "v_lin"},
    "o": {"o_proj", "out_proj", "c_proj", "dense", "wo", "o", "out_lin", "output"},
    "qkv": {"c_attn", "qkv_proj", "query_key_value", "wqkv", "qkv", "w_pack"},
}
_MLP_PARTS = {
    "gate": {"gate_proj", "w1", "gate", "wi_0"},  # T5 v1.1's gated MLP: wo(act(wi_0 x) * wi_1 x)
    "up": {"up_proj", "w3", "c_fc", "fc1", "dense_h_to_4h", "fc_in", "wi", "lin1", "wi_1"},
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

GROUPS = ("self-attention", "cross-attention", "MLP", "embeddings", "norms", "head", "other")
# Display order of components inside the summary.
COMPONENTS = (
    "self-attention q",
    "self-attention k",
    "self-attention v",
    "self-attention o",
    "self-attention qkv",
    "self-attention other",
    "cross-attention q",
    "cross-attention k",
    "cross-attention v",
    "cross-attention o",
    "cross-attention other",
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
    """Where a tensor sits: its stack (encoder/decoder, None in a decoder-only model), layer index (None outside
    the repeated blocks), component and group."""

    layer: int | None
    component: str
    group: str
    stack: str | None = None
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
    stack = next((p for p in lowered if p in _STACKS), None)

    def place(component: str, group: str, expert: int | None = None) -> Placement:
        return Placement(layer, component, group, stack, expert)

    tail = lowered[-1] if lowered else ""
    if any(_is_norm(p) for p in parts):
        return place("norms", "norms")
    if any(p in _HEADS for p in lowered):
        return place("head", "head")
    if any(p in _EMBEDDINGS for p in lowered):
        return place("embeddings", "embeddings")
    for kinds, group in ((_CROSS_ATTENTION, "cross-attention"), (_ATTENTION, "self-attention")):
        if any(p in kinds for p in lowered):
            part = next((key for key, names in _ATTN_PARTS.items() if tail in names), "other")
            return place(f"{group} {part}", group)
    if any(p in _MLP for p in lowered) or (layer is not None and tail in _BARE_MLP):
        if tail == "router" or (tail == "gate" and len(lowered) > 1 and lowered[-2] in _ROUTER_OWNERS):
            return place("MLP router", "MLP")
        part = next((key for key, names in _MLP_PARTS.items() if tail in names), "other")
        expert = _EXPERT.search(name)
        return place(f"MLP {part}", "MLP", int(expert.group(1)) if expert else None)
    return place("other", "other")
