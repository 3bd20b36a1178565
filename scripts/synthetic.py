"""Synthetic Llama-shaped checkpoints and PEFT LoRA adapters for benchmarks and tests.

Everything is written by streaming: the safetensors header is computed from shapes alone, then each
tensor's bytes are generated and written in bounded chunks, so building a 7B checkpoint needs only a few
tens of MiB of memory and never instantiates a model. The files use the real transformers
``LlamaForCausalLM`` tensor names and PEFT's adapter layout, so ``AutoModelForCausalLM.from_pretrained``
and ``PeftModel.from_pretrained`` load them as they would a downloaded model.

A small JSON "stamp" (``<out_dir>.synthetic.json``, next to the directory so that copies of the
checkpoint do not carry it) records what was written; calling a writer again with the same arguments
reuses the existing files instead of regenerating gigabytes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

# This repository's lora_cli, also when run as `python scripts/...` (sys.path then starts at scripts/).
if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from lora_cli.filenames import ADAPTER_CONFIG, ADAPTER_SAFETENSORS, CONFIG, INDEX_FILE
from lora_cli.io.dtypes import TORCH_TO_SAFETENSORS
from lora_cli.io.writer import OutputTensor
from lora_cli.io.writer import plan_shards as writer_plan_shards

ALL_LINEAR: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
STAMP_VERSION = 1
CHUNK_ELEMENTS = 1 << 22  # elements generated per chunk: bounds generation memory to ~16 MiB of fp32
INIT_STD = 0.02

_ST_DTYPE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


@dataclass(frozen=True)
class LlamaShape:
    """The architecture numbers that determine a Llama checkpoint's tensor shapes."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    max_positions: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def with_layers_mult(self, mult: int) -> LlamaShape:
        """The same shape with ``mult`` times the layers (memory of a streaming merge must not grow)."""
        return dataclasses.replace(self, layers=self.layers * mult)

    def linear_shape(self, module: str) -> tuple[int, int]:
        """``(out_features, in_features)`` of one of the seven linear modules."""
        kv = self.kv_heads * self.head_dim
        return {
            "q_proj": (self.heads * self.head_dim, self.hidden),
            "k_proj": (kv, self.hidden),
            "v_proj": (kv, self.hidden),
            "o_proj": (self.hidden, self.heads * self.head_dim),
            "gate_proj": (self.intermediate, self.hidden),
            "up_proj": (self.intermediate, self.hidden),
            "down_proj": (self.hidden, self.intermediate),
        }[module]


SHAPES: dict[str, LlamaShape] = {
    "tiny": LlamaShape(hidden=256, intermediate=688, layers=4, heads=8, kv_heads=4, vocab=1000),
    # TinyLlama-1.1B
    "1b": LlamaShape(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000),
    # Llama-2-7B
    "7b": LlamaShape(
        hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000, max_positions=4096
    ),
}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor to write: its name, shape, dtype, and how to fill it ("normal" or "ones")."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    fill: str = "normal"
    std: float = INIT_STD

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


# ----------------------------------------------------------------------------------------------------
# Streaming safetensors writer
# ----------------------------------------------------------------------------------------------------


def _safetensors_header(specs: Sequence[TensorSpec], metadata: dict[str, str]) -> bytes:
    """The 8-byte length prefix plus JSON header, padded with spaces to 8 bytes like safetensors does."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": _ST_DTYPE[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _chunks(spec: TensorSpec, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Yield the tensor's values in flat chunks of at most CHUNK_ELEMENTS, already in its dtype."""
    remaining = spec.numel
    while remaining:
        n = min(remaining, CHUNK_ELEMENTS)
        if spec.fill == "ones":
            chunk = torch.ones(n, dtype=spec.dtype)
        else:
            chunk = torch.empty(n, dtype=torch.float32).normal_(0.0, spec.std, generator=gen).to(spec.dtype)
        yield chunk
        remaining -= n


def write_safetensors_streaming(
    path: Path, specs: Sequence[TensorSpec], seed: int, metadata: dict[str, str] | None = None
) -> int:
    """Write ``specs`` to one safetensors file chunk by chunk; return the file size. fsyncs the file.

    Why: ``safetensors.torch.save_file`` needs every tensor in memory at once, which would make building
    a 7B checkpoint cost gigabytes and hide the memory behaviour we want to measure elsewhere.
    """
    gen = torch.Generator().manual_seed(seed)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(_safetensors_header(specs, metadata or {"format": "pt"}))
        for spec in specs:
            written = 0
            for chunk in _chunks(spec, gen):
                f.write(memoryview(chunk.view(torch.uint8).numpy()))
                written += chunk.numel() * chunk.element_size()
            if written != spec.nbytes:  # pragma: no cover - a bug guard, not a user error
                raise AssertionError(f"{spec.name}: wrote {written} bytes, expected {spec.nbytes}")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    return path.stat().st_size


# ----------------------------------------------------------------------------------------------------
# Base checkpoint
# ----------------------------------------------------------------------------------------------------


def llama_tensor_specs(shape: LlamaShape, dtype: torch.dtype = torch.bfloat16) -> list[TensorSpec]:
    """All tensors of an untied ``LlamaForCausalLM``, in the order transformers saves them."""
    specs = [TensorSpec("model.embed_tokens.weight", (shape.vocab, shape.hidden), dtype)]
    for i in range(shape.layers):
        p = f"model.layers.{i}"
        for m in ATTN_MODULES:
            specs.append(TensorSpec(f"{p}.self_attn.{m}.weight", shape.linear_shape(m), dtype))
        for m in ("gate_proj", "up_proj", "down_proj"):
            specs.append(TensorSpec(f"{p}.mlp.{m}.weight", shape.linear_shape(m), dtype))
        specs.append(TensorSpec(f"{p}.input_layernorm.weight", (shape.hidden,), dtype, fill="ones"))
        specs.append(TensorSpec(f"{p}.post_attention_layernorm.weight", (shape.hidden,), dtype, fill="ones"))
    specs.append(TensorSpec("model.norm.weight", (shape.hidden,), dtype, fill="ones"))
    specs.append(TensorSpec("lm_head.weight", (shape.vocab, shape.hidden), dtype))
    return specs


def plan_shards(specs: Sequence[TensorSpec], shard_bytes: int) -> list[list[TensorSpec]]:
    """Pack tensors in order into shards of at most ``shard_bytes`` (a lone big tensor gets its own), the way
    loractl's writer packs its output (``lora_cli.io.writer.plan_shards``)."""
    outputs = [OutputTensor(s.name, TORCH_TO_SAFETENSORS[s.dtype], tuple(s.shape)) for s in specs]
    by_name = {s.name: s for s in specs}
    planned = writer_plan_shards(outputs, [""] * len(outputs), shard_bytes)
    return [[by_name[t.name] for t in shard.tensors] for shard in planned]


def llama_config(shape: LlamaShape, dtype: torch.dtype = torch.bfloat16) -> dict[str, object]:
    """A ``config.json`` that transformers 4.x and 5.x both accept for ``LlamaForCausalLM``."""
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "hidden_size": shape.hidden,
        "initializer_range": INIT_STD,
        "intermediate_size": shape.intermediate,
        "max_position_embeddings": shape.max_positions,
        "mlp_bias": False,
        "num_attention_heads": shape.heads,
        "num_hidden_layers": shape.layers,
        "num_key_value_heads": shape.kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": shape.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": shape.rope_theta,
        "tie_word_embeddings": False,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
        "use_cache": True,
        "vocab_size": shape.vocab,
    }


def _stamp_path(out_dir: Path) -> Path:
    return out_dir.parent / f"{out_dir.name}.synthetic.json"


def _reuse(out_dir: Path, stamp: dict[str, object]) -> bool:
    """True if ``out_dir`` already holds exactly what ``stamp`` describes (all listed files present)."""
    path = _stamp_path(out_dir)
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if {k: v for k, v in old.items() if k != "files"} != stamp:
        return False
    return all(
        (out_dir / name).is_file() and (out_dir / name).stat().st_size == size
        for name, size in old.get("files", {}).items()
    )


def _prepare(out_dir: Path, stamp: dict[str, object]) -> bool:
    """Return True if reusable; otherwise empty ``out_dir`` (and drop the stale stamp) for a fresh write."""
    if _reuse(out_dir, stamp):
        return True
    _stamp_path(out_dir).unlink(missing_ok=True)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    return False


def _write_stamp(out_dir: Path, stamp: dict[str, object]) -> None:
    files = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir()) if p.is_file()}
    _stamp_path(out_dir).write_text(json.dumps({**stamp, "files": files}, indent=1))


def write_llama_checkpoint(
    out_dir: str | Path,
    shape: LlamaShape,
    dtype: torch.dtype = torch.bfloat16,
    shard_bytes: int = 1 << 30,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write a sharded, untied Llama checkpoint (random N(0, 0.02) weights, unit norms) to ``out_dir``.

    Produces ``config.json``, ``model-0000K-of-0000N.safetensors`` shards and
    ``model.safetensors.index.json`` (even for one shard, so every reader takes the sharded path).
    Reuses an identical earlier write. Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    stamp = {
        "kind": "llama",
        "version": STAMP_VERSION,
        "shape": dataclasses.asdict(shape),
        "dtype": str(dtype),
        "shard_bytes": shard_bytes,
        "seed": seed,
    }
    if _prepare(out_dir, stamp):
        return out_dir
    shards = plan_shards(llama_tensor_specs(shape, dtype), shard_bytes)
    weight_map: dict[str, str] = {}
    total_size = total_params = 0
    for k, shard in enumerate(shards, start=1):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        if progress:
            progress(f"writing {out_dir / name} ({sum(s.nbytes for s in shard) / 2**30:.2f} GiB)")
        write_safetensors_streaming(out_dir / name, shard, seed=seed * 100_003 + k)
        for spec in shard:
            weight_map[spec.name] = name
            total_size += spec.nbytes
            total_params += spec.numel
    index = {"metadata": {"total_size": total_size, "total_parameters": total_params}, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (out_dir / CONFIG).write_text(json.dumps(llama_config(shape, dtype), indent=2) + "\n")
    (out_dir / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
    _write_stamp(out_dir, stamp)
    return out_dir


QUANT_CONFIGS: dict[str, dict[str, object]] = {
    "fp8": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
    "nf4": {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "_load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": "bfloat16",
        "bnb_4bit_quant_storage": "uint8",
    },
}


def write_quantized_copy(
    base: str | Path, out_dir: str | Path, fmt: str, progress: Callable[[str], None] | None = None
) -> Path:
    """The bf16 checkpoint at ``base`` with every linear weight of the decoder layers quantized, as the Hub
    ships such models: FP8 with 128x128 fp32 block scales (DeepSeek-V3 layout), or bitsandbytes NF4 with
    double quantization (transformers' layout). One tensor at a time per shard; reuses an earlier write."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from lora_cli.quant import bnb, fp8

    base, out_dir = Path(base), Path(out_dir)
    stamp = {"kind": f"quantized-{fmt}", "version": STAMP_VERSION, "base": json.loads(_stamp_path(base).read_text())}
    if _prepare(out_dir, stamp):
        return out_dir
    index = json.loads((base / INDEX_FILE).read_text())
    weight_map: dict[str, str] = {}
    for shard in sorted(set(index["weight_map"].values())):
        if progress:
            progress(f"quantizing {base / shard} to {fmt}")
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(base / shard, "pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                value = handle.get_tensor(name)
                if ".layers." in name and name.endswith("proj.weight"):
                    if fmt == "fp8":
                        quantized, inverse = fp8.quantize_blocks(value, (128, 128))
                        parts = {name: quantized, name.removesuffix("weight") + "weight_scale_inv": inverse}
                    else:
                        # On a GPU box, bitsandbytes' CUDA quantizer (same layout) saves minutes at 7B.
                        on = value.cuda() if torch.cuda.is_available() else value
                        quantized = bnb.quantize_nf4(on, double_quant=True)
                        parts = {name + k: v.cpu() for k, v in quantized.items()}
                else:
                    parts = {name: value}
                tensors.update(parts)
                weight_map.update(dict.fromkeys(parts, shard))
        save_file({k: v.contiguous() for k, v in tensors.items()}, out_dir / shard, metadata={"format": "pt"})
    (out_dir / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2) + "\n")
    config = json.loads((base / CONFIG).read_text())
    config["quantization_config"] = QUANT_CONFIGS[fmt]
    (out_dir / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    shutil.copyfile(base / "generation_config.json", out_dir / "generation_config.json")
    _write_stamp(out_dir, stamp)
    return out_dir


# ----------------------------------------------------------------------------------------------------
# LoRA adapter
# ----------------------------------------------------------------------------------------------------


def lora_tensor_specs(
    shape: LlamaShape, rank: int, targets: Sequence[str], dtype: torch.dtype = torch.float32
) -> list[TensorSpec]:
    """PEFT-named ``lora_A`` ([r, in]) and ``lora_B`` ([out, r]) tensors for every layer and target.

    B is random (not PEFT's zero init) so that merging really changes the weights: with std 0.02 for
    both and scale alpha/r = 2, the delta is ~0.006 per entry against base weights of ~0.02.
    """
    unknown = set(targets) - set(ALL_LINEAR)
    if unknown:
        raise ValueError(f"unknown target modules {sorted(unknown)}; choose from {ALL_LINEAR}")
    specs = []
    for i in range(shape.layers):
        for m in ALL_LINEAR:
            if m not in targets:
                continue
            block = "self_attn" if m in ATTN_MODULES else "mlp"
            prefix = f"base_model.model.model.layers.{i}.{block}.{m}"
            out_f, in_f = shape.linear_shape(m)
            specs.append(TensorSpec(f"{prefix}.lora_A.weight", (rank, in_f), dtype))
            specs.append(TensorSpec(f"{prefix}.lora_B.weight", (out_f, rank), dtype))
    return specs


def lora_config(rank: int, alpha: int, targets: Sequence[str], base_model: str | None) -> dict[str, object]:
    """``adapter_config.json`` with the fields ``peft`` 0.21 writes from ``LoraConfig(...).save_pretrained``.

    Written by hand (not via ``peft``) so importing this module stays cheap and independent of peft;
    keys an older peft does not know are ignored by it.
    """
    return {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": base_model,
        "bias": "none",
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": alpha,
        "lora_bias": False,
        "lora_dropout": 0.0,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": rank,
        "rank_pattern": {},
        "revision": None,
        "target_modules": sorted(targets),
        "target_parameters": None,
        "task_type": "CAUSAL_LM",
        "trainable_token_indices": None,
        "use_dora": False,
        "use_rslora": False,
    }


def write_lora_adapter(
    out_dir: str | Path,
    shape: LlamaShape,
    rank: int = 64,
    alpha: int = 128,
    targets: Sequence[str] = ALL_LINEAR,
    seed: int = 1,
    base_model: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) for ``shape``.

    All ``targets`` of every layer get random A and B (fp32 by default, as PEFT saves them).
    Reuses an identical earlier write. Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    targets = tuple(targets)
    stamp = {
        "kind": "lora",
        "version": STAMP_VERSION,
        "shape": dataclasses.asdict(shape),
        "rank": rank,
        "alpha": alpha,
        "targets": sorted(targets),
        "seed": seed,
        "base_model": base_model,
        "dtype": str(dtype),
    }
    if _prepare(out_dir, stamp):
        return out_dir
    write_safetensors_streaming(
        out_dir / ADAPTER_SAFETENSORS, lora_tensor_specs(shape, rank, targets, dtype), seed=seed
    )
    config = lora_config(rank, alpha, targets, base_model)
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    _write_stamp(out_dir, stamp)
    return out_dir


def checkpoint_bytes(model_dir: str | Path) -> int:
    """Total size of the ``*.safetensors`` files in a directory (what a merge must read and write)."""
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))
