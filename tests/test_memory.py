"""`loractl memory`: predictions against measurements, and the JSON it prints."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from lora_cli.adapters.loading import load_adapter
from lora_cli.cli.app import app
from lora_cli.engine import fused_block_elements
from lora_cli.io.checkpoint import open_checkpoint
from lora_cli.memory import measure_reference, measure_streaming, phase_peaks, predict, reference_available
from lora_cli.memstats import MemorySample
from lora_cli.sources import AdapterSpec, local_source

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import synthetic  # the benchmark's streaming checkpoint writer, from scripts/

runner = CliRunner()
MiB = 2**20


def write_state_dict_lora(root: Path, rows: int, cols: int, rank: int = 4) -> tuple[Path, Path]:
    """A one-tensor fp32 base ("big.weight") and a LoRA adapter on it, written by hand (no model needed)."""
    generator = torch.Generator().manual_seed(0)
    base = root / "base"
    base.mkdir()
    save_file(
        {"big.weight": torch.randn(rows, cols, generator=generator), "small.weight": torch.ones(8)},
        base / "model.safetensors",
    )
    adapter = root / "adapter"
    adapter.mkdir()
    save_file(
        {
            "base_model.model.big.lora_A.weight": torch.randn(rank, cols, generator=generator),
            "base_model.model.big.lora_B.weight": torch.randn(rows, rank, generator=generator),
        },
        adapter / "adapter_model.safetensors",
    )
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": ["big"]}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return base, adapter


def test_streaming_working_set_matches_the_measured_peak(tmp_path: Path) -> None:
    # One 64 MiB fp32 tensor: the working set (raw input, one output buffer, and the row-blocked fused path's block
    # buffer of a few MiB: 132 MiB here) dwarfs the allocator's noise, so the model's terms are what is tested, not
    # the fixed baseline of this process. A weight-sized B @ A (64 MiB more) would fail both checks.
    base, adapter = write_state_dict_lora(tmp_path, 2048, 8192)
    prediction = predict(open_checkpoint(base), [load_adapter(adapter)])
    working = prediction.streaming_peak_bytes - prediction.baseline_bytes
    block = fused_block_elements((2048, 8192)) * 4
    assert block < 16 * MiB
    assert working == pytest.approx(128 * MiB + block, rel=0.01)
    measured = measure_streaming(local_source(base), [AdapterSpec(local_source(adapter))])
    if measured.kernel_peak_rss_bytes is None:
        pytest.skip("needs Linux's VmHWM reset (/proc/self/clear_refs)")
    # The kernel's exact high-water mark, not the 20 ms samples: on a busy 2-core box the sampler can miss the
    # ~20 ms when all three terms coexist. 15%: the file-backed pages of the written shard (a few MiB) and glibc's
    # small allocations; the terms are 64 MiB each, so a missing or extra one is off by 33% or more.
    grown = measured.kernel_peak_rss_bytes - measured.start_rss_bytes
    assert grown == pytest.approx(working, rel=0.15)
    assert [p.phase for p in measured.phases][-1] == "done" and "merge+write" in {p.phase for p in measured.phases}


def test_the_fits_verdict_uses_available_ram(tmp_path: Path) -> None:
    base, adapter = write_state_dict_lora(tmp_path, 64, 32)
    prediction = predict(open_checkpoint(base), [load_adapter(adapter)])
    assert prediction.available_ram_bytes <= prediction.total_ram_bytes
    for path in prediction.paths:
        assert path.fits == (path.peak_bytes <= prediction.available_ram_bytes)
        assert path.peak_bytes == sum(path.terms.values())
    assert [p.name for p in prediction.paths] == ["transformers + PEFT (float32)", "loractl merge (streaming)"]


def test_phase_peaks_fold_the_timeline() -> None:
    samples = [MemorySample(0.0, 10, 1, "load"), MemorySample(0.5, 30, 2, "merge"), MemorySample(1.5, 20, 5, "merge")]
    rows = phase_peaks([*samples, MemorySample(2.0, 12, 1, "done")])
    assert [(r.phase, r.peak_anon_bytes, r.peak_file_bytes) for r in rows] == [
        ("load", 10, 1),
        ("merge", 30, 5),
        ("done", 12, 1),
    ]
    assert rows[1].seconds == pytest.approx(1.5)


@pytest.mark.skipif(not reference_available(), reason="needs peft")
def test_in_memory_prediction_matches_transformers_and_peft(tmp_path: Path) -> None:
    # A 116M-parameter bf16 Llama (232 MB): the model term is a third of the peak, so a wrong model of it (fp32
    # instead of bf16, or a second copy) misses by more than the 20% allowed for import and allocator variation.
    shape = synthetic.LlamaShape(hidden=1024, intermediate=2816, layers=4, heads=8, kv_heads=8, vocab=32000)
    base = synthetic.write_llama_checkpoint(tmp_path / "base", shape, torch.bfloat16)
    adapter = synthetic.write_lora_adapter(tmp_path / "lora", shape, rank=8, alpha=16)
    prediction = predict(open_checkpoint(base), [load_adapter(adapter)])
    measured = measure_reference(base, adapter, "auto")
    assert measured.error is None
    assert measured.path == "transformers + PEFT (bfloat16)"
    assert measured.peak_rss_bytes == pytest.approx(prediction.in_memory_peak_bytes, rel=0.2)
    assert {"load", "merge", "save"} <= {p.phase for p in measured.phases}


def test_cli_json_schema(tmp_path: Path) -> None:
    base, adapter = write_state_dict_lora(tmp_path, 64, 32)
    result = runner.invoke(app, ["memory", str(base), str(adapter), "--json", "--measure"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    predicted = data["predicted"]
    for key in ("in_memory_peak_bytes", "in_memory_fp32_peak_bytes", "streaming_peak_bytes", "total_ram_bytes"):
        assert isinstance(predicted[key], int) and predicted[key] > 0
    streaming = data["measured"]["streaming"]
    assert streaming["peak_anon_bytes"] >= streaming["baseline_anon_bytes"] > 0
    assert {"phase", "seconds", "peak_anon_bytes", "peak_file_bytes"} <= set(streaming["phases"][0])


def test_cli_human_output_says_what_fits(tmp_path: Path) -> None:
    base, adapter = write_state_dict_lora(tmp_path, 64, 32)
    result = runner.invoke(app, ["memory", str(base), str(adapter)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "loractl merge (streaming)" in result.stdout and "available" in result.stdout


def test_cli_mismatched_adapter_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    base, _ = write_state_dict_lora(tmp_path / "a", 64, 32)
    _, adapter = write_state_dict_lora(tmp_path / "b", 48, 32)  # B has 48 rows, the base's tensor 64
    result = runner.invoke(app, ["memory", str(base), str(adapter)])
    assert result.exit_code == 2 and "big.weight" in result.stderr


@pytest.mark.cuda
def test_cuda_prediction_matches_the_measured_peaks(tmp_path: Path) -> None:
    # The GPU holds the working copies, one output buffer, the factors and cuBLAS's workspace; the host holds the
    # page-locked rings and the CUDA runtime, measured by starting it. 10% on the GPU (the caching allocator
    # rounds blocks up); 25% on the host, as the issue asks of the prediction.
    base, adapter = write_state_dict_lora(tmp_path, 2048, 8192)
    prediction = predict(open_checkpoint(base), [load_adapter(adapter)], device="cuda")
    measured = measure_streaming(local_source(base), [AdapterSpec(local_source(adapter))], device="cuda")
    assert measured.peak_gpu_bytes == pytest.approx(prediction.streaming_gpu_bytes, rel=0.10)
    assert measured.peak_anon_bytes == pytest.approx(prediction.streaming_peak_bytes, rel=0.25)
