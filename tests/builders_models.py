"""Tiny vision-language and mixture-of-experts models, saved by transformers 5 in their on-disk layout.

Their checkpoints name weights otherwise than the running model (what PEFT names adapters after): VLMs store
`model.layers.N` or `language_model.model.layers.N` where the model runs `model.language_model.layers.N`, MoE
models store experts one by one (or fused and interleaved, gpt-oss) where the model runs fused stacks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers
from torch import nn

TEXT = dict(
    vocab_size=128,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
)
VISION = dict(
    hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4
)


def _qwen_vl(config_cls: type, model_cls: type) -> nn.Module:
    vision = dict(
        depth=1,
        embed_dim=16,
        hidden_size=16,
        num_heads=2,
        out_hidden_size=16,
        patch_size=2,
        spatial_merge_size=1,
        temporal_patch_size=1,
        intermediate_size=16,
    )
    text = dict(**TEXT, rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}, bos_token_id=0, eos_token_id=1)
    config = config_cls(
        text_config=text, vision_config=vision, image_token_id=100, video_token_id=101, vision_start_token_id=102
    )
    return model_cls(config)


def _llava_like(config_cls: type, model_cls: type, text_type: str, vision_type: str, **extra: object) -> nn.Module:
    text = dict(model_type=text_type, **TEXT)
    if text_type == "gemma3_text":
        text["sliding_window"] = 4
    vision = dict(model_type=vision_type, **VISION)
    if vision_type == "clip_vision_model":
        vision["projection_dim"] = 16
    return model_cls(config_cls(text_config=text, vision_config=vision, image_token_index=100, **extra))


VLMS: dict[str, Callable[[], nn.Module]] = {
    "qwen2_vl": lambda: _qwen_vl(transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration),
    "qwen2_5_vl": lambda: _qwen_vl(transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration),
    "paligemma": lambda: _llava_like(
        transformers.PaliGemmaConfig,
        transformers.PaliGemmaForConditionalGeneration,
        "gemma",
        "siglip_vision_model",
        projection_dim=16,
    ),
    "llava": lambda: _llava_like(
        transformers.LlavaConfig, transformers.LlavaForConditionalGeneration, "llama", "clip_vision_model"
    ),
    "gemma3": lambda: _llava_like(
        transformers.Gemma3Config,
        transformers.Gemma3ForConditionalGeneration,
        "gemma3_text",
        "siglip_vision_model",
        mm_tokens_per_image=4,
    ),
}

MOES: dict[str, Callable[[], nn.Module]] = {
    "qwen3_moe": lambda: transformers.Qwen3MoeForCausalLM(
        transformers.Qwen3MoeConfig(**TEXT, moe_intermediate_size=8, num_experts=4, num_experts_per_tok=2)
    ),
    "mixtral": lambda: transformers.MixtralForCausalLM(
        transformers.MixtralConfig(**TEXT, num_local_experts=4, num_experts_per_tok=2)
    ),
    "gpt_oss": lambda: transformers.GptOssForCausalLM(
        transformers.GptOssConfig(
            **TEXT, num_local_experts=4, num_experts_per_tok=2, layer_types=["full_attention"] * 2
        )
    ),
    "qwen2_moe": lambda: transformers.Qwen2MoeForCausalLM(
        transformers.Qwen2MoeConfig(
            **TEXT,
            moe_intermediate_size=8,
            shared_expert_intermediate_size=24,
            num_experts=4,
            num_experts_per_tok=2,
        )
    ),
}


def build(models: dict[str, Callable[[], nn.Module]], name: str, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """The model, seeded, in `dtype`, with weights large enough that every tensor is non-trivial."""
    torch.manual_seed(seed)
    return models[name]().to(dtype).eval()
