"""The usual in-memory merge (transformers loads the whole base, PEFT adds the adapter, `merge_and_unload`, save).

`loractl memory --measure-reference` runs it in a subprocess (`python -m lora_cli.peft_reference ...`) and samples
its memory; `scripts/bench_merge.py` times it (`--dtype bfloat16 --device cpu|cuda --sync`). transformers and peft
are imported inside `run` only, so peft stays an optional dependency. Phase markers go to stdout as they happen,
then one RESULT line of JSON: per-phase seconds and load diagnostics (missing/unexpected keys, LoRA modules found,
warnings), so a benchmark can check that the checkpoint and adapter were understood completely.
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

import lora_cli

PHASE_PREFIX = "PHASE "
RESULT_PREFIX = "RESULT "


def _phase(name: str) -> None:
    sys.stdout.write(f"{PHASE_PREFIX}{name}\n")
    sys.stdout.flush()


class _ListHandler(logging.Handler):
    """Collects WARNING+ log records (transformers/peft report load problems through logging)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}"[:500])


def import_reference() -> None:
    """What the reference process imports before it reads a byte: its fixed cost, which `memory` measures."""
    import torch  # noqa: F401
    from peft import PeftModel  # noqa: F401
    from peft.tuners.lora import LoraLayer  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401


def run(base: str, adapter: str, out: str, dtype: str = "auto", device: str = "cpu", sync: bool = False) -> dict:
    """Merge the PEFT way; `dtype` is "auto" (the checkpoint's), a dtype name, or "default" (pass none).

    `sync` calls os.sync() after saving, so the output is durable like the other benchmarked methods.
    """
    _phase("import")
    started = time.perf_counter()
    import_reference()
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    result: dict[str, Any] = {"import_s": time.perf_counter() - started}
    kwargs: dict[str, Any] = {"output_loading_info": True}
    if dtype != "default":
        kwargs["dtype"] = dtype if dtype == "auto" else getattr(torch, dtype)
    if device == "cuda":
        kwargs["device_map"] = "cuda"
    _phase("load")
    t = time.perf_counter()
    model, info = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    result["load_base_s"] = time.perf_counter() - t
    result["base_loading_info"] = {k: sorted(map(str, v))[:20] for k, v in info.items() if v}
    result["loaded_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    _phase("adapter")
    t = time.perf_counter()
    model = PeftModel.from_pretrained(model, adapter)
    result["load_adapter_s"] = time.perf_counter() - t
    result["lora_modules"] = sum(isinstance(m, LoraLayer) for m in model.modules())
    _phase("merge")
    t = time.perf_counter()
    model = model.merge_and_unload()
    if device == "cuda":
        torch.cuda.synchronize()
    result["merge_s"] = time.perf_counter() - t
    _phase("save")
    t = time.perf_counter()
    model.save_pretrained(out)
    result["save_s"] = time.perf_counter() - t
    if sync:
        t = time.perf_counter()
        os.sync()
        result["sync_s"] = time.perf_counter() - t
    if device == "cuda":
        result["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
    _phase("done")
    result["seconds"] = time.perf_counter() - started
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    if argv is None and sys.argv[1:] == ["--baseline"]:
        # The resident size after the imports alone (anonymous and file-backed): `memory` predicts with it.
        import_reference()
        from lora_cli.memstats import read_rss

        anon, file_backed = read_rss()
        sys.stdout.write(f"{RESULT_PREFIX}{json.dumps({'rss_bytes': anon + file_backed})}\n")
        return 0
    parser.add_argument("base")
    parser.add_argument("adapter")
    parser.add_argument("out")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--sync", action="store_true", help="os.sync() after saving")
    args = parser.parse_args(argv)
    if lora_cli.OMP_WAIT_POLICY_SET_HERE:
        # The reference runs as its users run it: without the wait policy importing lora_cli set for the merge.
        del os.environ["OMP_WAIT_POLICY"]
    handler = _ListHandler()
    logging.getLogger().addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run(args.base, args.adapter, args.out, args.dtype, args.device, args.sync)
    result["warnings"] = [f"{w.category.__name__}: {w.message}"[:500] for w in caught] + handler.messages
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
