"""The usual in-memory merge (transformers loads the whole base, PEFT adds the adapter, `merge_and_unload`, save).

`loractl memory --measure-reference` runs it in a subprocess (`python -m lora_cli.peft_reference ...`) and samples
its memory. transformers and peft are imported inside `run` only, so peft stays an optional dependency.
The core is `scripts/peft_merge_reference.py`'s, with the load dtype as a parameter and phase markers on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

PHASE_PREFIX = "PHASE "
RESULT_PREFIX = "RESULT "


def _phase(name: str) -> None:
    sys.stdout.write(f"{PHASE_PREFIX}{name}\n")
    sys.stdout.flush()


def run(base: str, adapter: str, out: str, dtype: str) -> dict[str, Any]:
    """Merge the PEFT way; `dtype` is "auto" (the checkpoint's), a dtype name, or "default" (pass none)."""
    _phase("import")
    started = time.perf_counter()
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    if dtype != "default":
        kwargs["dtype"] = dtype if dtype == "auto" else getattr(torch, dtype)
    _phase("load")
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    loaded_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    _phase("adapter")
    model = PeftModel.from_pretrained(model, adapter)
    _phase("merge")
    model = model.merge_and_unload()
    _phase("save")
    model.save_pretrained(out)
    _phase("done")
    return {"seconds": time.perf_counter() - started, "loaded_dtype": loaded_dtype}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base")
    parser.add_argument("adapter")
    parser.add_argument("out")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args(argv)
    result = run(args.base, args.adapter, args.out, args.dtype)
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
