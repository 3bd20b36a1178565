"""Merge a LoRA adapter the usual transformers + PEFT way; the baseline that ``bench_merge.py`` times.

``python scripts/peft_merge_reference.py BASE ADAPTER OUT [--device cpu|cuda]`` loads the whole model in
bf16 (``device_map="cuda"`` for cuda), loads the adapter, ``merge_and_unload()``, ``save_pretrained(OUT)``
and ``os.sync()`` so the output is durable like the other benchmarked methods. Prints one JSON line on
stdout with per-phase seconds and load diagnostics (missing/unexpected keys, LoRA modules found, warnings),
so the benchmark can check that the synthetic checkpoint and adapter were understood completely.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from typing import Any


class _ListHandler(logging.Handler):
    """Collects WARNING+ log records (transformers/peft report load problems through logging)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}"[:500])


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("base")
    p.add_argument("adapter")
    p.add_argument("out")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    return p.parse_args(argv)


def merge(base: str, adapter: str, out: str, device: str) -> dict[str, Any]:
    """Run the reference merge and return timings and diagnostics."""
    t0 = time.perf_counter()
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    result: dict[str, Any] = {"import_s": time.perf_counter() - t0}
    kwargs: dict[str, Any] = {"dtype": torch.bfloat16, "output_loading_info": True}
    if device == "cuda":
        kwargs["device_map"] = "cuda"
    t = time.perf_counter()
    model, info = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    result["load_base_s"] = time.perf_counter() - t
    result["base_loading_info"] = {k: sorted(map(str, v))[:20] for k, v in info.items() if v}

    t = time.perf_counter()
    model = PeftModel.from_pretrained(model, adapter)
    result["load_adapter_s"] = time.perf_counter() - t
    result["lora_modules"] = sum(isinstance(m, LoraLayer) for m in model.modules())

    t = time.perf_counter()
    model = model.merge_and_unload()
    if device == "cuda":
        torch.cuda.synchronize()
    result["merge_s"] = time.perf_counter() - t

    t = time.perf_counter()
    model.save_pretrained(out)
    result["save_s"] = time.perf_counter() - t
    t = time.perf_counter()
    os.sync()
    result["sync_s"] = time.perf_counter() - t
    if device == "cuda":
        result["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
    result["seconds"] = time.perf_counter() - t0
    return result


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    handler = _ListHandler()
    logging.getLogger().addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = merge(args.base, args.adapter, args.out, args.device)
    result["warnings"] = [f"{w.category.__name__}: {w.message}"[:500] for w in caught] + handler.messages
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
