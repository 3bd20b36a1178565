"""Each format's logical tensors against its reference dequantization, bit for bit, on tiny tensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_cli.errors import InputError, LoraCtlError
from lora_cli.io.checkpoint import open_checkpoint
from lora_cli.quant.base import QuantizedTensor
from lora_cli.quant.view import logical_index
from tests.builders_quant import fp8_block_quantize, fp8_reference, pack_awq, pack_gptq, write_checkpoint

FP8_CONFIG = {
    "model_type": "llama",
    "torch_dtype": "bfloat16",
    "quantization_config": {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    },
}


def lifted(path: Path) -> dict:
    return logical_index(open_checkpoint(path)).tensors


def assert_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(
        a.view(torch.uint8) if a.dtype.itemsize == 1 else a, b.view(torch.uint8) if b.dtype.itemsize == 1 else b
    ), "not bit-identical"


@pytest.mark.parametrize("shape", [(256, 384), (200, 300), (130, 129), (64, 96)])
def test_fp8_blocks_dequantize_as_deepseek_and_transformers(tmp_path: Path, shape: tuple[int, int]) -> None:
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    torch.manual_seed(0)
    q, scale = fp8_block_quantize(torch.randn(shape) * 0.05, (128, 128))
    path = write_checkpoint(
        tmp_path / "fp8",
        [{"layer.weight": q, "layer.weight_scale_inv": scale, "norm.weight": torch.ones(4)}],
        FP8_CONFIG,
    )
    tensors = lifted(path)
    assert set(tensors) == {"layer.weight", "norm.weight"}  # the scale is consumed
    logical = tensors["layer.weight"]
    assert isinstance(logical, QuantizedTensor) and logical.shape == shape and logical.dtype == "F32"
    assert logical.output_dtype == "BF16"
    value = logical.dequantize()
    assert torch.equal(value, fp8_reference(q, scale, (128, 128)))  # partial blocks: the grid rounded up
    assert torch.equal(value, _dequantize_fp8_weight(q.clone(), scale, [128, 128], torch.float32))


def test_fp8_scale_formats_ue8m0_uint8_tensor_channel(tmp_path: Path) -> None:
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    torch.manual_seed(1)
    q = (torch.randn(256, 256) * 20).to(torch.float8_e4m3fn)
    exponents = torch.randint(110, 130, (2, 2), dtype=torch.uint8)
    cases = {
        "e8m0": (exponents.view(torch.float8_e8m0fnu), [128, 128]),
        "u8": (exponents, [128, 128]),
        "tensor": (torch.tensor(0.0123), None),
        "channel": (torch.rand(256, 1) * 0.01, None),
    }
    reference = Fp8Dequantize(None)
    for case, (scale, block) in cases.items():
        config = {**FP8_CONFIG, "quantization_config": {"quant_method": "fp8", "weight_block_size": block}}
        path = write_checkpoint(tmp_path / case, [{"w.weight": q, "w.weight_scale_inv": scale}], config)
        value = lifted(path)["w.weight"].dequantize()
        grid = scale if scale.dim() == 2 else scale.reshape(1, 1)
        expected = reference._dequantize_one(q, grid, output_dtype=torch.float32)
        assert torch.equal(value, expected), case


def test_fp8_scale_in_another_shard(tmp_path: Path) -> None:
    q, scale = fp8_block_quantize(torch.randn(160, 144), (128, 128))
    path = write_checkpoint(
        tmp_path / "sharded", [{"a.weight": q, "b.bias": torch.zeros(3)}, {"a.weight_scale_inv": scale}], FP8_CONFIG
    )
    logical = lifted(path)["a.weight"]
    assert logical.parts["scale"].file.name != logical.parts["weight"].file.name
    assert torch.equal(logical.dequantize(), fp8_reference(q, scale, (128, 128)))


def test_missing_scale_names_the_tensor(tmp_path: Path) -> None:
    q, _ = fp8_block_quantize(torch.randn(128, 128), (128, 128))
    path = write_checkpoint(tmp_path / "noscale", [{"a.weight": q}], FP8_CONFIG)
    with pytest.raises(InputError, match=r"a\.weight has no a\.weight_scale_inv"):
        lifted(path)


def test_wrong_scale_grid_is_refused(tmp_path: Path) -> None:
    q, _ = fp8_block_quantize(torch.randn(256, 256), (128, 128))
    path = write_checkpoint(tmp_path / "grid", [{"a.weight": q, "a.weight_scale_inv": torch.ones(3, 3)}], FP8_CONFIG)
    with pytest.raises(InputError, match=r"a\.weight_scale_inv"):
        lifted(path)


def test_unknown_method_and_unannounced_tensors_are_refused_by_name(tmp_path: Path) -> None:
    config = {"quantization_config": {"quant_method": "hqq"}}
    path = write_checkpoint(tmp_path / "hqq", [{"a.weight": torch.ones(2, 2)}], config)
    with pytest.raises(LoraCtlError, match="quant_method 'hqq' is not supported"):
        lifted(path)
    q, scale = fp8_block_quantize(torch.randn(128, 128), (128, 128))
    path = write_checkpoint(tmp_path / "bare", [{"a.weight": q, "a.weight_scale_inv": scale}], {"model_type": "x"})
    with pytest.raises(LoraCtlError, match=r"fp8 quantized tensors .* no quantization_config"):
        lifted(path)


@pytest.mark.parametrize(
    ("bits", "desc_act", "version"), [(4, False, "gptq"), (4, True, "gptq"), (8, True, "gptq_v2"), (2, False, "gptq")]
)
def test_gptq_layout(tmp_path: Path, bits: int, desc_act: bool, version: str) -> None:
    torch.manual_seed(2)
    rows, cols, group = 64, 48, 16
    maxq = (1 << bits) - 1
    intweight = torch.randint(0, maxq + 1, (rows, cols))
    intzeros = torch.randint(1 if version == "gptq" else 0, maxq + 1, (rows // group, cols))
    scales = (torch.rand(rows // group, cols) * 0.01).to(torch.float16)
    g_idx = torch.arange(rows) // group
    if desc_act:
        g_idx = g_idx[torch.randperm(rows)]
    qweight, qzeros = pack_gptq(intweight, intzeros, bits, v1=version == "gptq")
    config = {
        "torch_dtype": "float16",
        "quantization_config": {
            "quant_method": "gptq",
            "bits": bits,
            "group_size": group,
            "desc_act": desc_act,
            "checkpoint_format": version,
        },
    }
    path = write_checkpoint(
        tmp_path / "gptq",
        [
            {
                "l.qweight": qweight,
                "l.qzeros": qzeros,
                "l.scales": scales,
                "l.g_idx": g_idx.to(torch.int32),
                "l.bias": torch.zeros(cols),
            }
        ],
        config,
    )
    tensors = lifted(path)
    assert set(tensors) == {"l.weight", "l.bias"}
    # The documented formula on the integers before packing: scales[g] * (q - z[g]), in fp16 as the kernels do.
    expected = (scales[g_idx] * (intweight - intzeros[g_idx]).to(torch.float16)).t()
    assert_bits(tensors["l.weight"].dequantize(), expected)


def test_awq_gemm_layout(tmp_path: Path) -> None:
    torch.manual_seed(3)
    rows, cols, group = 64, 32, 16
    intweight = torch.randint(0, 16, (rows, cols))
    intzeros = torch.randint(0, 16, (rows // group, cols))
    scales = (torch.rand(rows // group, cols) * 0.01).to(torch.float16)
    config = {
        "torch_dtype": "float16",
        "quantization_config": {
            "quant_method": "awq",
            "bits": 4,
            "group_size": group,
            "version": "gemm",
            "zero_point": True,
        },
    }
    path = write_checkpoint(
        tmp_path / "awq",
        [{"l.qweight": pack_awq(intweight), "l.qzeros": pack_awq(intzeros), "l.scales": scales}],
        config,
    )
    groups = torch.arange(rows) // group
    expected = ((intweight - intzeros[groups]).to(torch.float16) * scales[groups]).t()
    assert_bits(lifted(path)["l.weight"].dequantize(), expected)
    config["quantization_config"]["version"] = "gemv"
    path = write_checkpoint(
        tmp_path / "gemv",
        [{"l.qweight": pack_awq(intweight), "l.qzeros": pack_awq(intzeros), "l.scales": scales}],
        config,
    )
    with pytest.raises(LoraCtlError, match="AWQ version 'gemv' is not supported"):
        lifted(path)


def test_mxfp4_matches_transformers(tmp_path: Path) -> None:
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    torch.manual_seed(4)
    blocks = torch.randint(0, 256, (2, 6, 2, 16), dtype=torch.uint8)
    scales = torch.randint(118, 134, (2, 6, 2), dtype=torch.uint8)
    config = {"torch_dtype": "bfloat16", "quantization_config": {"quant_method": "mxfp4"}}
    path = write_checkpoint(
        tmp_path / "mx",
        [{"e.gate_up_proj_blocks": blocks, "e.gate_up_proj_scales": scales, "e.gate_up_proj_bias": torch.zeros(2, 6)}],
        config,
    )
    tensors = lifted(path)
    assert set(tensors) == {"e.gate_up_proj", "e.gate_up_proj_bias"}
    expected = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)
    assert_bits(tensors["e.gate_up_proj"].dequantize(), expected)


@pytest.fixture(scope="module")
def bf16_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.builders import tiny_llama
    from tests.builders_quant import BNB_WIDTHS

    path = tmp_path_factory.mktemp("bnb") / "base"
    tiny_llama(torch.bfloat16, **BNB_WIDTHS).save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", ["nf4", "nf4-dq", "fp4", "fp4-dq", "int8"])
def test_bitsandbytes_dequantizes_as_peft(tmp_path: Path, bf16_base: Path, kind: str) -> None:
    from tests.builders_quant import bnb_dequantized, load_bnb, save_bnb

    path = save_bnb(bf16_base, tmp_path / kind, kind)
    tensors = lifted(path)
    reference = bnb_dequantized(load_bnb(path))
    quantized = {n: t for n, t in tensors.items() if isinstance(t, QuantizedTensor)}
    assert set(quantized) == set(reference) and len(quantized) == 14  # 7 linears in each of 2 layers
    assert all(".absmax" not in n and "SCB" not in n and "quant_state" not in n for n in tensors)
    for name, logical in quantized.items():
        assert_bits(logical.dequantize(), reference[name])
    assert quantized[next(iter(quantized))].dtype == ("F32" if kind == "int8" else "BF16")


def test_bitsandbytes_missing_absmax_names_it(tmp_path: Path, bf16_base: Path) -> None:
    from safetensors.torch import load_file, save_file

    from tests.builders_quant import save_bnb

    path = save_bnb(bf16_base, tmp_path / "nf4", "nf4")
    state = load_file(path / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight.absmax"]
    save_file(state, path / "model.safetensors")
    with pytest.raises(InputError, match=r"model\.layers\.1\.mlp\.up_proj\.weight has no .*\.absmax"):
        lifted(path)


def _bnb_4bit_parts(weight: torch.Tensor, blocksize: int, quant_type: str, nested: bool) -> tuple:
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
    stored = state.as_dict(packed=True)
    parts = {"weight": packed, "state": stored[f"quant_state.bitsandbytes__{quant_type}"]}
    parts.update({k: stored[k] for k in ("absmax", "quant_map", "nested_absmax", "nested_quant_map") if k in stored})
    return packed, state, parts


def _decode_bnb_4bit(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The 4-bit decode as the lifted weight runs it: with the quant state's JSON, read from its part."""
    import json

    from lora_cli.quant import bnb

    return bnb._decode_4bit(parts, state=json.loads(parts["state"].numpy().tobytes().decode("utf-8")))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize(
    ("shape", "blocksize", "dtype"),
    [
        ((64, 128), 64, torch.bfloat16),
        ((48, 256), 128, torch.float16),
        ((32, 32), 64, torch.bfloat16),  # rows narrower than a block
        ((33, 77), 64, torch.float32),  # odd: the last block partial, the last byte half used
        ((2, 3, 96), 4096, torch.bfloat16),  # stacked, one partial block
    ],
)
def test_bnb_4bit_formula_is_the_library_kernel(
    shape: tuple, blocksize: int, dtype: torch.dtype, quant_type: str, nested: bool
) -> None:
    """Our dequantization equals bitsandbytes' portable kernel bit for bit (small steps too, so that the step
    loop is crossed), and its CPU kernel in value where that kernel is right (rows a multiple of the block)."""
    import bitsandbytes.functional as F
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    from lora_cli.quant import bnb

    torch.manual_seed(3)
    weight = (torch.randn(shape) * torch.linspace(0.01, 1, shape[-1])).to(dtype)
    packed, state, parts = _bnb_4bit_parts(weight, blocksize, quant_type, nested)
    absmax = state.absmax
    if nested:
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    portable = _dequantize_4bit_compute(packed.reshape(-1), absmax.float(), state.code, blocksize, shape, dtype)
    ours = _decode_bnb_4bit(parts)
    assert ours.dtype == dtype and ours.shape == shape
    assert torch.equal(ours.view(-1).view(torch.uint8), portable.reshape(-1).view(torch.uint8))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bnb, "STEP", 2 * blocksize)
        assert torch.equal(_decode_bnb_4bit(parts).view(-1).view(torch.uint8), ours.view(-1).view(torch.uint8))
    if shape[-1] % blocksize == 0:
        assert torch.equal(ours, F.dequantize_4bit(packed, state))
    # Either way the values are the weight's, within 4-bit precision (FP4 over one 4096 block: 0.17).
    assert (ours.float() - weight.float()).norm() < 0.2 * weight.float().norm()


def test_bnb_int8_formula_is_the_library_kernel() -> None:
    import bitsandbytes.functional as F

    from lora_cli.quant import bnb

    torch.manual_seed(4)
    weight = torch.randn(33, 77, dtype=torch.float16)
    quantized, scales, _ = F.int8_vectorwise_quant(weight)
    expected = F.int8_vectorwise_dequant(quantized, scales)
    ours = bnb._decode_8bit({"weight": quantized, "scb": scales})
    assert torch.equal(ours.view(torch.int32), expected.view(torch.int32))


@pytest.mark.parametrize("preset", ["FP8_DYNAMIC", "FP8_BLOCK", "W8A8", "W4A16", "W4A16_ASYM", "W8A16"])
def test_compressed_tensors_match_the_library_quantize_dequantize(tmp_path: Path, preset: str) -> None:
    from tests.builders_quant import compressed_module

    torch.manual_seed(5)
    weight = (torch.randn(48, 256) * 0.05).to(torch.bfloat16)
    stored, group, expected = compressed_module(preset, weight)
    config = {
        "torch_dtype": "bfloat16",
        "quantization_config": {
            "quant_method": "compressed-tensors",
            "config_groups": {"group_0": group},
            "ignore": ["lm_head"],
        },
    }
    shard = {f"model.proj.{k}": v.contiguous() for k, v in stored.items()} | {"lm_head.weight": weight}
    tensors = lifted(write_checkpoint(tmp_path / preset, [shard], config))
    assert set(tensors) == {"model.proj.weight", "lm_head.weight"}
    logical = tensors["model.proj.weight"]
    assert logical.shape == (48, 256) and logical.dtype == "BF16"
    assert_bits(logical.dequantize(), expected)


def test_compressed_tensors_refuses_other_formats_by_name(tmp_path: Path) -> None:
    from tests.builders_quant import compressed_module

    stored, group, _ = compressed_module("W4A16", torch.randn(16, 128))
    group["format"] = "marlin-24"
    config = {"quantization_config": {"quant_method": "compressed-tensors", "config_groups": {"g": group}}}
    path = write_checkpoint(tmp_path / "m", [{f"p.{k}": v.contiguous() for k, v in stored.items()}], config)
    with pytest.raises(LoraCtlError, match=r"compressed-tensors format 'marlin-24' .* is not supported"):
        lifted(path)


def test_fbgemm_fp8_per_channel_weight_scale(tmp_path: Path) -> None:
    """fbgemm_fp8 stores `weight_scale` [out, 1] (fp32), multiplied like DeepSeek's inverse scales."""
    torch.manual_seed(6)
    q = (torch.randn(48, 64) * 30).to(torch.float8_e4m3fn)
    scale = torch.rand(48, 1) * 0.01
    config = {"torch_dtype": "bfloat16", "quantization_config": {"quant_method": "fbgemm_fp8"}}
    path = write_checkpoint(tmp_path / "fbgemm", [{"l.weight": q, "l.weight_scale": scale}], config)
    tensors = lifted(path)
    assert set(tensors) == {"l.weight"}
    assert torch.equal(tensors["l.weight"].dequantize(), q.float() * scale)
