"""Do CPU and CUDA merges give the same bytes? Merge one synthetic checkpoint on both and count differences.

Also compares each with PEFT's merge_and_unload on the same device when peft is installed. Prints one JSON
object: per pair, how many edited tensors are bit-identical and the worst error in ulps (counted at the
larger magnitude of the two values).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic import SHAPES, write_llama_checkpoint, write_lora_adapter

from lora_cli.engine import WriteOptions
from lora_cli.io.checkpoint import open_checkpoint
from lora_cli.io.safetensors_file import read_tensor
from lora_cli.merge import merge
from lora_cli.numerics import max_ulps
from lora_cli.sources import AdapterSpec, local_source


def peft_merge(base: Path, adapter: Path, out: Path, device: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).to(device)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.to("cpu").save_pretrained(out)


def compare(a: Path, b: Path, names: list[str]) -> dict[str, object]:
    left, right = open_checkpoint(a), open_checkpoint(b)
    identical, worst = 0, 0.0
    for name in names:
        x, y = read_tensor(left.tensors[name]), read_tensor(right.tensors[name])
        if torch.equal(x, y):
            identical += 1
        else:
            worst = max(worst, max_ulps(x, y))
    return {"edited_tensors": len(names), "bit_identical": identical, "max_ulps": worst}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="loractl-devices-"))
    shape = SHAPES[args.size]
    base = write_llama_checkpoint(work / "base", shape)
    adapter = write_lora_adapter(work / "adapter", shape, rank=16, alpha=32)
    outputs = {}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        summary = merge(
            local_source(base),
            [AdapterSpec(local_source(adapter))],
            work / f"loractl-{device}",
            WriteOptions(device=device),
        )
        outputs[f"loractl-{device}"] = summary
        with contextlib.suppress(ImportError):  # peft is optional: without it, loractl's outputs only
            peft_merge(base, adapter, work / f"peft-{device}", device)
    names = outputs["loractl-cpu"].provenance["tensors_edited"]
    report: dict[str, object] = {"size": args.size, "gpu": torch.cuda.get_device_name() if len(devices) > 1 else None}
    pairs = [
        ("loractl-cpu", "peft-cpu"),
        ("loractl-cpu", "loractl-cuda"),
        ("loractl-cuda", "peft-cuda"),
        ("peft-cpu", "peft-cuda"),
    ]
    for a, b in pairs:
        if (work / a).exists() and (work / b).exists():
            report[f"{a} vs {b}"] = compare(work / a, work / b, names)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
