"""`diff` on encoder-decoder models (T5, Whisper: tiny configs built here) groups by stack and layer.

The encoder's layer N and the decoder's layer N are two rows of the layer table; cross-attention (T5's
EncDecAttention, Whisper's encoder_attn) is a component of its own, and T5's wi_0/wi_1/wo and Whisper's bare
fc1/fc2 are the MLP. B is A with a few named tensors changed, so the expected rows are known exactly.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_cli.components import classify
from lora_cli.diff import DiffOptions, diff
from lora_cli.sources import local_source


def _tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2,
        feed_forward_proj="gated-gelu", decoder_start_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return T5ForConditionalGeneration(config)


def _tiny_whisper():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(
        vocab_size=64, num_mel_bins=8, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, d_model=16, max_source_positions=8,
        max_target_positions=8, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    return WhisperForConditionalGeneration(config)


def _a_and_b(model, root: Path, changed: list[str]) -> tuple[Path, Path]:
    a, b = root / "a", root / "b"
    model.save_pretrained(a)
    shutil.copytree(a, b)
    state = load_file(b / "model.safetensors")
    for name in changed:
        state[name] = state[name] + 0.5
    save_file(state, b / "model.safetensors", metadata={"format": "pt"})
    return a, b


CASES = {
    "t5": (
        _tiny_t5,
        [
            "encoder.block.0.layer.0.SelfAttention.q.weight",
            "decoder.block.0.layer.1.EncDecAttention.q.weight",
            "decoder.block.0.layer.2.DenseReluDense.wi_0.weight",
            "decoder.block.0.layer.2.DenseReluDense.wi_1.weight",
            "decoder.block.0.layer.2.DenseReluDense.wo.weight",
        ],
        {
            ("encoder", 0): ["self-attention q"],
            ("decoder", 0): ["cross-attention q", "MLP gate", "MLP up", "MLP down"],
        },
    ),
    "whisper": (
        _tiny_whisper,
        [
            "model.encoder.layers.0.fc1.weight",
            "model.decoder.layers.0.encoder_attn.k_proj.weight",
            "model.decoder.layers.0.self_attn.v_proj.weight",
            "model.decoder.layers.0.fc2.weight",
        ],
        {
            ("encoder", 0): ["MLP up"],
            ("decoder", 0): ["self-attention v", "cross-attention k", "MLP down"],
        },
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_encoder_and_decoder_layers_are_rows_of_their_own(case: str, tmp_path: Path) -> None:
    factory, changed, expected = CASES[case]
    model = factory()
    a, b = _a_and_b(model, tmp_path, changed)
    result = diff(local_source(a), local_source(b), DiffOptions(device="cpu"))

    differing = {(layer.stack, layer.layer): layer.components_differ for layer in result.layers if layer.differ}
    assert differing == expected
    # Every layered tensor lands in its own stack's row: the rows' counts add up to the stack's tensors.
    names = list(load_file(a / "model.safetensors"))
    for stack in ("encoder", "decoder"):
        rows = {layer.layer: layer.tensors for layer in result.layers if layer.stack == stack}
        for number, count in rows.items():
            assert count == sum(1 for n in names if classify(n).stack == stack and classify(n).layer == number)
    assert {(layer.stack, layer.layer) for layer in result.layers if layer.layer is not None} == {
        (stack, n) for stack in ("encoder", "decoder") for n in (0, 1)
    }


def test_t5_and_whisper_names_are_placed() -> None:
    """No attention or MLP projection of either model is left in "other"."""
    for factory in (_tiny_t5, _tiny_whisper):
        for name, param in factory().named_parameters():
            place = classify(name)
            if param.dim() == 2 and place.layer is not None and "relative_attention_bias" not in name:
                assert place.group in ("self-attention", "cross-attention", "MLP"), (name, place)
                assert not place.component.endswith("other"), (name, place)
