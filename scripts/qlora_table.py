"""QLoRA semantics, measured: which base should an adapter trained on a 4-bit model be merged into?

Trains a LoRA on a tiny Llama quantized to NF4 by bitsandbytes (as QLoRA does), to match the 16-bit model's
logits, then compares with the PeftModel on the 4-bit base as trained (the model the user has):
merging into the quantized base (loractl dequantizes it) and merging into the original 16-bit weights.

    python scripts/qlora_table.py            # the README table
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.builders import tiny_llama
from tests.builders_quant import BNB_WIDTHS, load_bnb, save_bnb


def train_qlora(root: Path, steps: int, seed: int = 0) -> Path:
    """A LoRA trained on the NF4 model to reproduce the bf16 teacher's logits (so it learns the quantization
    error as well as anything else): the adapter the table is about."""
    from peft import LoraConfig, get_peft_model

    teacher = tiny_llama(torch.float32, seed=seed, **BNB_WIDTHS)
    tiny_llama(torch.bfloat16, seed=seed, **BNB_WIDTHS).save_pretrained(root / "bf16")
    save_bnb(root / "bf16", root / "nf4", "nf4-dq")
    student = load_bnb(root / "nf4")
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)
    model = get_peft_model(student, config)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    generator = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        tokens = torch.randint(0, 96, (8, 16), generator=generator)
        with torch.no_grad():
            target = teacher(tokens).logits
        loss = torch.nn.functional.mse_loss(model(tokens).logits.float(), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(root / "lora")
    adapter_config = json.loads((root / "lora" / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = "tiny-llama-bnb-4bit"
    (root / "lora" / "adapter_config.json").write_text(json.dumps(adapter_config))
    return root / "lora"


def logits(path: Path, tokens: torch.Tensor, adapter: Path | None = None, quantized: bool = False) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = load_bnb(path) if quantized else AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return model.eval()(tokens).logits.float()


def merge(base: Path, adapter: Path, out: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "lora_cli", "merge", str(base), str(adapter), str(out), "--device", "cpu", "--quiet"],
        check=True,
    )
    return out


def measure(root: Path, steps: int) -> list[dict[str, object]]:
    adapter = train_qlora(root, steps)
    tokens = torch.randint(0, 96, (16, 32), generator=torch.Generator().manual_seed(99))
    trained = logits(root / "nf4", tokens, adapter, quantized=True)  # the PeftModel on the 4-bit base
    rows = []
    for label, base in (
        ("into the quantized base (loractl, dequantized)", root / "nf4"),
        ("into the original bf16 weights", root / "bf16"),
    ):
        ours = logits(merge(base, adapter, root / f"merged-{base.name}"), tokens)
        diff = (ours - trained).abs()
        agree = (ours.argmax(-1) == trained.argmax(-1)).float().mean().item()
        rows.append(
            {"merge": label, "max_abs": diff.max().item(), "mean_abs": diff.mean().item(), "top1_agreement": agree}
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps of the QLoRA adapter")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(Path(tmp), args.steps)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print("| merge | max abs logit diff | mean abs logit diff | top-1 agreement |")
    print("|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['merge']} | {row['max_abs']:.4f} | {row['mean_abs']:.5f} | {row['top1_agreement']:.1%} |")


if __name__ == "__main__":
    main()
