"""Predicted vs measured peak memory of a merge, both ways, on a synthetic Llama checkpoint (README's table).

Writes a bf16 Llama-shaped checkpoint and a rank-64 LoRA on all seven linear modules (``synthetic.py``), then runs
``loractl memory BASE ADAPTER --measure --measure-reference --json`` in a fresh process, so the prediction uses
that process's own baseline and is made before anything runs. Prints a markdown table and deletes the files
(unless ``--keep``).

Examples::

    python scripts/bench_memory.py --size tiny            # quick check
    python scripts/bench_memory.py --size 1b              # the README table
    python scripts/bench_memory.py --size 1b --no-reference --workdir /data/bench --keep
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synthetic  # a sibling module, importable once scripts/ is on the path

MiB = 2**20
TOLERANCE = 0.25  # the streaming prediction must be within 25% of the measured peak


def log(message: str) -> None:
    print(f"[bench_memory] {message}", file=sys.stderr, flush=True)


def run(size: str, workdir: Path, reference: bool) -> dict:
    shape = synthetic.SHAPES[size]
    log(f"writing the {size} checkpoint and adapter under {workdir}")
    base = synthetic.write_llama_checkpoint(workdir / f"base-{size}", shape, torch.bfloat16)
    adapter = synthetic.write_lora_adapter(workdir / f"lora-{size}", shape, rank=64, alpha=128)
    command = [sys.executable, "-m", "lora_cli", "memory", str(base), str(adapter), "--measure", "--json"]
    if reference:
        command.append("--measure-reference")
    log("running: " + " ".join(command))
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"loractl memory failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout)


def rows(report: dict) -> list[tuple[str, int, int, int, str]]:
    """(path, predicted, measured, the other measure, which measure) per measured path."""
    predicted = report["predicted"]
    out = []
    streaming = report["measured"]["streaming"]
    out.append(
        (
            "loractl merge (streaming)",
            predicted["streaming_peak_bytes"],
            streaming["peak_anon_bytes"],
            streaming["peak_rss_bytes"],
            "anonymous",
        )
    )
    for key, measured in report["measured"].items():
        if not key.startswith("in_memory") or measured.get("error"):
            continue
        guess = predicted["in_memory_fp32_peak_bytes"] if "float32" in key else predicted["in_memory_peak_bytes"]
        out.append((measured["path"], guess, measured["peak_rss_bytes"], measured["peak_anon_bytes"], "resident"))
    return out


def markdown(report: dict, size: str) -> str:
    predicted = report["predicted"]
    lines = [
        f"Synthetic {size} Llama (bf16, {predicted['base_bytes'] / 2**30:.2f} GiB) + rank-64 LoRA on all linear "
        f"modules ({predicted['adapter_bytes'] / MiB:.0f} MiB fp32), {platform.machine()}, "
        f"{psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, torch {torch.__version__}.",
        "",
        "| path | predicted peak | measured peak | compared with | error | other measure |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for path, guess, measured, other, which in rows(report):
        error = (guess - measured) / measured
        other_name = "resident" if which == "anonymous" else "anonymous"
        lines.append(
            f"| {path} | {guess / MiB:,.0f} MiB | {measured / MiB:,.0f} MiB | {which} | {error:+.1%} | "
            f"{other / MiB:,.0f} MiB {other_name} |"
        )
    streaming = report["measured"]["streaming"]
    lines += ["", "loractl merge, RAM by phase:", "", "| phase | seconds | peak anonymous | peak file-backed |"]
    lines.append("|---|---:|---:|---:|")
    for phase in streaming["phases"]:
        lines.append(
            f"| {phase['phase']} | {phase['seconds']:.2f} | {phase['peak_anon_bytes'] / MiB:,.0f} MiB | "
            f"{phase['peak_file_bytes'] / MiB:,.0f} MiB |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(synthetic.SHAPES), default="tiny")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where to write the checkpoint (default: a temp dir)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and adapter")
    parser.add_argument("--no-reference", action="store_true", help="skip the transformers + PEFT runs")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw report here")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-memory-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        report = run(args.size, workdir, reference=not args.no_reference)
    finally:
        if not args.keep:
            for name in (f"base-{args.size}", f"lora-{args.size}"):
                shutil.rmtree(workdir / name, ignore_errors=True)
                (workdir / f"{name}.synthetic.json").unlink(missing_ok=True)
            if args.workdir is None:
                shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print(markdown(report, args.size))
    guess, measured = report["predicted"]["streaming_peak_bytes"], report["measured"]["streaming"]["peak_anon_bytes"]
    if abs(guess - measured) > TOLERANCE * measured:
        log(f"streaming prediction off by more than {TOLERANCE:.0%}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
