"""Tiny quantized checkpoints built in the tests: FP8 and MXFP4 written by hand, bitsandbytes saved by
transformers, compressed-tensors by its own compressors, GPTQ/AWQ packed by the formats' documented layouts."""

from __future__ import annotations

import functools
import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
TARGETS = ["q_proj", "v_proj", "down_proj"]
FP8_BLOCK = [16, 24]  # 64 columns are 2 full blocks and a partial one, as 7168/128 is on DeepSeek-V3 shapes


def write_checkpoint(path: Path, shards: list[dict[str, torch.Tensor]], config: dict | None) -> Path:
    """One file, or several shards with an index (so a weight's scale can lie in another shard)."""
    path.mkdir(parents=True, exist_ok=True)
    if len(shards) == 1:
        save_file(shards[0], path / "model.safetensors")
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, path / name)
            weight_map.update(dict.fromkeys(shard, name))
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    return path


def fp8_block_quantize(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-style: one fp32 scale per block (ragged edges included), E4M3 weight = W / scale."""
    rows, cols = weight.shape
    grid = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    scale = torch.empty(grid)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(grid[0]):
        for j in range(grid[1]):
            tile = weight[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]].float()
            s = tile.abs().amax().clamp(min=1e-12) / 448.0
            scale[i, j] = s
            q[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]] = (tile / s).to(torch.float8_e4m3fn)
    return q, scale


def fp8_reference(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """DeepSeek's weight_dequant, element by element: y[i, j] = fp32(x[i, j]) * s[i // bm, j // bn]."""
    rows, cols = q.shape
    s = scale.float()[torch.arange(rows) // block[0]][:, torch.arange(cols) // block[1]]
    return q.float() * s


def pack_gptq(intweight: torch.Tensor, intzeros: torch.Tensor, bits: int, v1: bool = True):
    """AutoGPTQ's pack: intweight [in, out] -> qweight [in*bits/32, out]; zeros [groups, out] (minus 1 in v1)."""
    per = 32 // bits
    weight = intweight.to(torch.int64)
    qweight = torch.zeros(weight.shape[0] // per, weight.shape[1], dtype=torch.int64)
    for j in range(per):
        qweight |= weight[j::per] << (bits * j)
    zeros = intzeros.to(torch.int64) - (1 if v1 else 0)
    zeros = zeros & ((1 << bits) - 1)
    qzeros = torch.zeros(zeros.shape[0], zeros.shape[1] // per, dtype=torch.int64)
    for j in range(per):
        qzeros |= zeros[:, j::per] << (bits * j)
    return _int32(qweight), _int32(qzeros)


def pack_awq(intweight: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """AutoAWQ's pack (reorder=True): [rows, cols] -> [rows, cols*bits/32], columns in the order 0 2 4 6 1 3 5 7."""
    per = 32 // bits
    weight = intweight.to(torch.int64)
    packed = torch.zeros(weight.shape[0], weight.shape[1] // per, dtype=torch.int64)
    for col in range(packed.shape[1]):
        for i in range(per):
            packed[:, col] |= weight[:, col * per + AWQ_ORDER[i]] << (i * bits)
    return _int32(packed)


def _int32(values: torch.Tensor) -> torch.Tensor:
    """uint32 bit patterns held in int64 -> the int32 with the same bits."""
    return torch.where(values >= 2**31, values - 2**32, values).to(torch.int32)


def save_bnb(base: Path, out: Path, kind: str) -> Path:
    """A real bitsandbytes checkpoint: the 16-bit base loaded quantized by transformers on CPU and saved."""
    from transformers import BitsAndBytesConfig

    options = {
        "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False),
        "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
        "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
        "fp4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
        "int8": dict(load_in_8bit=True),
    }[kind]
    model = load_bnb(base, BitsAndBytesConfig(**options, bnb_4bit_compute_dtype=torch.bfloat16))
    model.save_pretrained(out)
    return out


def load_bnb(path: Path, quantization_config: object = None):
    from transformers import AutoModelForCausalLM

    kwargs = {"quantization_config": quantization_config} if quantization_config is not None else {}
    model = AutoModelForCausalLM.from_pretrained(path, device_map="cpu", **kwargs).eval()
    for module in model.modules():
        # bitsandbytes repacks 4-bit weights for an AVX512 CPU kernel at inference, which fails on layers narrower
        # than a block; off, it dequantizes and multiplies as it does on a GPU (the QLoRA forward).
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def bnb_dequantized(model) -> dict[str, torch.Tensor]:
    """PEFT's own dequantization of every bitsandbytes Linear in a loaded model, keyed by weight name."""
    from peft.utils.integrations import dequantize_bnb_weight

    found = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        kind = type(weight).__name__
        if kind == "Params4bit":
            found[f"{name}.weight"] = dequantize_bnb_weight(weight, state=weight.quant_state)
        elif kind == "Int8Params":
            found[f"{name}.weight"] = dequantize_bnb_weight(weight, state=module.state)
    return found


def compressed_module(
    preset: str, weight: torch.Tensor, group_size: int | None = None
) -> tuple[dict[str, torch.Tensor], dict, torch.Tensor]:
    """One Linear compressed by compressed-tensors with a preset scheme: its stored tensors, its config group, and
    the library's own quantize-dequantize of the weight (`fake_quantize`), the values a merge must start from."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    scheme = preset_name_to_scheme(preset, ["Linear"])
    args = scheme.weights
    if group_size is not None:
        args.group_size = group_size
    if args.strategy == "block":  # one scale per block, the ragged edge blocks included (zeros change no amax)
        rows, cols = args.block_structure
        grid = (math.ceil(weight.shape[0] / rows), math.ceil(weight.shape[1] / cols))
        padded = weight.new_zeros(grid[0] * rows, grid[1] * cols)
        padded[: weight.shape[0], : weight.shape[1]] = weight
        tiles = padded.reshape(grid[0], rows, grid[1], cols)
        low, high = tiles.amin(dim=(1, 3)), tiles.amax(dim=(1, 3))
    elif args.strategy == "group":
        grouped = weight.reshape(weight.shape[0], -1, args.group_size)
        low, high = grouped.amin(dim=-1), grouped.amax(dim=-1)
    else:
        low, high = weight.amin(dim=1, keepdim=True), weight.amax(dim=1, keepdim=True)
    scale, zero_point = calculate_qparams(low, high, args)
    fmt = {"FP8_DYNAMIC": "float-quantized", "FP8_BLOCK": "float-quantized", "W8A8": "int-quantized"}.get(
        preset, "pack-quantized"
    )
    compressor = BaseCompressor.get_value_from_registry(fmt)
    stored = compressor.compress({"weight": weight, "weight_scale": scale, "weight_zero_point": zero_point}, scheme)
    group = {**scheme.model_dump(mode="json", exclude_none=True), "format": fmt}
    return dict(stored), group, fake_quantize(weight, scale, zero_point, args)


def with_weights(path: Path, dtype: torch.dtype):
    """The tiny Llama with a state dict of our choosing (a dequantized base) in `dtype`."""

    def build():
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()

    return build


# Layer widths that are multiples of bitsandbytes' 64-element block, as in every real model: bitsandbytes 0.50's
# CPU kernel dequantizes rows narrower than a block (or not a multiple of it) with the wrong block's absmax (a
# relative error of 0.97 on a 32-wide layer, where its own portable kernel gives 0.09; see test_quant_formats.py).
BNB_WIDTHS = {"hidden_size": 64, "intermediate_size": 128}


def build_quant_bases(root: Path) -> dict[str, Path]:
    """A bf16 tiny Llama, a LoRA on it, its NF4 (double-quantized, saved by bitsandbytes) and FP8 (block-scaled,
    written here) versions, and each one's reference dequantized base."""
    from peft import LoraConfig

    from tests.builders import make_adapter, tiny_llama

    factory = functools.partial(tiny_llama, torch.bfloat16, **BNB_WIDTHS)
    factory().save_pretrained(root / "bf16")
    make_adapter(factory, LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False), root / "lora", scale=0.1)
    save_bnb(root / "bf16", root / "nf4", "nf4-dq")
    # The reference base for NF4: PEFT's own dequantization of every Linear4bit (bf16, the quant state's dtype).
    plain = load_file(root / "bf16" / "model.safetensors")
    plain.update(bnb_dequantized(load_bnb(root / "nf4")))
    _save_plain(root / "bf16", root / "nf4-deq", plain)
    _write_fp8(root / "bf16", root / "fp8", root / "fp8-deq")
    return {name: root / name for name in ("bf16", "lora", "nf4", "nf4-deq", "fp8", "fp8-deq")}


def _save_plain(template: Path, out: Path, state: dict[str, torch.Tensor]) -> None:
    out.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors")
    (out / "config.json").write_text((template / "config.json").read_text())


def _write_fp8(template: Path, out: Path, deq: Path) -> None:
    """FP8 block-scaled the DeepSeek way (written by hand); the fp32 reference base dequantized by transformers."""
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    stored, reference = {}, {}
    for name, value in load_file(template / "model.safetensors").items():
        if name.endswith("proj.weight"):
            q, scale = fp8_block_quantize(value.float(), tuple(FP8_BLOCK))
            stored[name], stored[name.removesuffix("weight") + "weight_scale_inv"] = q, scale
            reference[name] = _dequantize_fp8_weight(q.clone(), scale, FP8_BLOCK, torch.float32)
        else:
            stored[name], reference[name] = value, value.float()
    _save_plain(template, out, stored)
    config = json.loads((template / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "weight_block_size": FP8_BLOCK,
    }
    (out / "config.json").write_text(json.dumps(config))
    _save_plain(template, deq, reference)


def write_format_base(template: Path, out: Path, fmt: str) -> dict[str, torch.Tensor]:
    """The tiny bf16 Llama with every decoder linear weight stored in `fmt` (GPTQ with desc_act, AWQ GEMM, or
    compressed-tensors W4A16), built from the weights' own integer codes; returns the reference dequantized state
    (the documented formula on the codes before packing, or compressed-tensors' fake_quantize)."""
    state, reference = {}, {}
    generator = torch.Generator().manual_seed(11)
    group = 16
    for name, value in load_file(template / "model.safetensors").items():
        if not (".layers." in name and name.endswith("proj.weight")):
            state[name], reference[name] = value, value
            continue
        stem = name.removesuffix("weight")
        if fmt == "compressed":
            stored, _, expected = compressed_module("W4A16_ASYM", value, group)
            state.update({stem + k: v.contiguous() for k, v in stored.items()})
            reference[name] = expected
            continue
        weight = value.float().t()  # [in, out], as GPTQ and AWQ store it
        rows, cols = weight.shape
        grouped = weight.reshape(rows // group, group, cols)
        low, high = grouped.amin(dim=1), grouped.amax(dim=1)
        scales = ((high - low) / 15).clamp(min=1e-6).to(torch.float16)
        zeros = torch.round(-low / scales.float()).clamp(1, 15).to(torch.int64)
        g_idx = torch.arange(rows) // group
        if fmt == "gptq":
            g_idx = g_idx[torch.randperm(rows, generator=generator)]  # desc_act: rows in any group order
        codes = torch.round(weight / scales.float()[g_idx] + zeros[g_idx]).clamp(0, 15).to(torch.int64)
        if fmt == "gptq":
            qweight, qzeros = pack_gptq(codes, zeros, 4)
            state.update({stem + "qweight": qweight, stem + "qzeros": qzeros, stem + "g_idx": g_idx.to(torch.int32)})
        else:
            state.update({stem + "qweight": pack_awq(codes), stem + "qzeros": pack_awq(zeros)})
        state[stem + "scales"] = scales
        reference[name] = (scales[g_idx] * (codes - zeros[g_idx]).to(torch.float16)).t().contiguous()
    config = json.loads((template / "config.json").read_text())
    config["quantization_config"] = {
        "gptq": {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": True, "sym": False},
        "awq": {"quant_method": "awq", "bits": 4, "group_size": group, "version": "gemm", "zero_point": True},
        "compressed": {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "config_groups": {
                "group_0": {**compressed_module("W4A16_ASYM", torch.randn(4, 32), group)[1], "targets": ["Linear"]}
            },
        },
    }[fmt]
    write_checkpoint(out, [state], config)
    return reference


E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])  # FP4's magnitudes; bit 3 of a code is the sign
# The quantization_config of openai/gpt-oss-20b's config.json: experts in MXFP4, everything else bf16.
GPT_OSS_MXFP4 = {
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
    "quant_method": "mxfp4",
}


def pack_mxfp4(stack: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An expert stack as gpt-oss runs it, [E, in, out], in the layout its checkpoints store: `_blocks` uint8
    [E, out, in/32, 16], two E2M1 codes a byte (low nibble first), `_scales` uint8 [E, out, in/32] E8M0.

    The OCP MX rule as triton_kernels' `downcast_to_mxfp_torch` applies it (what transformers' `Mxfp4Quantize`
    calls; it needs triton and the `kernels` package): per 32 values along `in`, the scale is amax / 6 rounded up
    to a power of two, then each value / scale goes to the nearest E2M1 value (ties to the smaller magnitude)."""
    rows = stack.float().transpose(1, 2)
    experts, out, width = rows.shape
    groups = rows.reshape(experts, out, width // 32, 32)
    amax = groups.abs().amax(-1, keepdim=True)
    bits = ((amax / 6).view(torch.int32) + 0x7FFFFF) & 0x7F800000  # the exponent, rounded up
    scale = bits.view(torch.float32)
    q = torch.where(scale > 0, groups / scale, 0.0)  # an all-zero group: scale 2^-127, codes 0
    magnitude = (q.abs().unsqueeze(-1) - E2M1).abs().argmin(-1)
    codes = (magnitude | ((q < 0).to(torch.int64) << 3)).to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.contiguous(), (bits >> 23).squeeze(-1).to(torch.uint8).contiguous()


def write_gpt_oss_mxfp4(template: Path, out: Path) -> Path:
    """The bf16 gpt-oss checkpoint at `template` with its expert stacks stored in MXFP4 as gpt-oss ships them,
    in two shards: the scales in the second, apart from their blocks."""
    weights, scales = {}, {}
    for name, value in load_file(template / "model.safetensors").items():
        if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            weights[name + "_blocks"], scales[name + "_scales"] = pack_mxfp4(value)
        else:
            weights[name] = value
    config = json.loads((template / "config.json").read_text())
    config["quantization_config"] = GPT_OSS_MXFP4
    return write_checkpoint(out, [weights, scales], config)


def merge_warnings(base: Path, adapter: Path, out: Path, named_base: str) -> list[str]:
    """The warnings of `loractl merge --json` for a copy of `adapter` whose config names `named_base`."""
    from typer.testing import CliRunner

    from lora_cli.cli.app import app

    lora = out.with_name(out.name + "-lora")
    shutil.copytree(adapter, lora)
    config = json.loads((lora / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = named_base
    (lora / "adapter_config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(app, ["merge", str(base), str(lora), str(out), "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["warnings"]
