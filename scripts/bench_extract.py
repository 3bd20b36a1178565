"""Benchmark ``loractl extract`` against mergekit's ``mergekit-extract-lora`` on the same pair.

Builds a synthetic Llama-shaped bf16 base and a rank-R LoRA on all seven linear modules (``synthetic.py``),
merges them with ``loractl merge`` into the "fine-tune", then runs both extractors at the same rank as
subprocesses, one after the other: wall time (interpreter start-up included), peak memory of the process tree
(anonymous apart from file-backed, sampled every 20 ms as in ``bench_merge.py``), and the reconstruction error
of every extracted module, computed here the same way for both adapters: ||(tuned - base) - scale * B @ A|| /
||tuned - base|| per module, and over all modules (Frobenius norms, fp32 deltas).

mergekit must be installed where it cannot change the main environment's torch/transformers/peft, e.g.::

    python -m venv --system-site-packages /tmp/mkvenv
    /tmp/mkvenv/bin/pip install mergekit==0.1.5

mergekit by default saves the (unchanged) embeddings and lm_head at full rank in modules_to_save; they are
excluded here (``-e embed_tokens -e lm_head``) so that both tools do the same work: the linear modules.

Examples::

    python scripts/bench_extract.py --size tiny --rank 16                 # quick end-to-end check
    python scripts/bench_extract.py --size 1b --rank 64 --markdown        # README numbers
    python scripts/bench_extract.py --size 1b --rank 32 --lora-rank 64    # truncating a rank-64 delta to 32
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(Path(__file__).resolve().parent), str(REPO_ROOT)]
import synthetic  # noqa: E402  (a sibling module, importable once scripts/ is on the path)

from lora_cli.memstats import TreeSampler  # noqa: E402  (the same process-tree sampler as the merge benchmark)

DEFAULT_MERGEKIT = Path("/tmp/mkvenv/bin/mergekit-extract-lora")
MiB = 1 << 20


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def run_measured(name: str, command: list[str], logs: Path) -> dict[str, Any]:
    log(f"{name}: {' '.join(command)}")
    started = time.perf_counter()
    with open(logs / f"{name}.out", "wb") as out, open(logs / f"{name}.err", "wb") as err:
        proc = subprocess.Popen(command, stdout=out, stderr=err, cwd=REPO_ROOT)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        code = proc.wait()
        peaks = sampler.stop()
    seconds = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"{name} failed ({code}); see {logs / (name + '.err')}")
    return {"seconds": seconds, "peak_anon_bytes": peaks.anon, "peak_total_bytes": peaks.total}


def _tensors(model_dir: Path) -> dict[str, Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / shard for name, shard in weight_map.items()}
    found = {}
    for path in model_dir.glob("*.safetensors"):
        with safe_open(path, "pt") as handle:
            found.update({key: path for key in handle.keys()})  # noqa: SIM118
    return found


def _load(where: dict[str, Path], name: str) -> torch.Tensor:
    with safe_open(where[name], "pt") as handle:
        return handle.get_tensor(name)


def _pattern(config: dict, key: str, module: str, default: float) -> float:
    import re

    for pattern, value in (config.get(key) or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def reconstruction_errors(base: Path, tuned: Path, adapter: Path) -> dict[str, Any]:
    """Per-module and overall relative Frobenius error of the adapter's deltas against tuned - base."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    base_at, tuned_at = _tensors(base), _tensors(tuned)
    errors: dict[str, float] = {}
    residual_sq = total_sq = 0.0
    with safe_open(adapter / "adapter_model.safetensors", "pt") as handle:
        for key in handle.keys():  # noqa: SIM118
            if not key.endswith("lora_A.weight"):
                continue
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            a = handle.get_tensor(key).float()
            b = handle.get_tensor(key.replace("lora_A", "lora_B")).float()
            rank = _pattern(config, "rank_pattern", module, config["r"])
            alpha = _pattern(config, "alpha_pattern", module, config["lora_alpha"])
            scale = alpha / (rank**0.5 if config.get("use_rslora") else rank)
            name = f"{module}.weight"
            delta = _load(tuned_at, name).float() - _load(base_at, name).float()
            norm_sq = float(torch.linalg.vector_norm(delta)) ** 2
            delta -= (b @ a) * scale
            res_sq = float(torch.linalg.vector_norm(delta)) ** 2
            errors[module] = (res_sq / norm_sq) ** 0.5 if norm_sq else 0.0
            residual_sq += res_sq
            total_sq += norm_sq
    return {
        "modules": len(errors),
        "overall": (residual_sq / total_sq) ** 0.5 if total_sq else 0.0,
        "worst_module": max(errors.values()) if errors else 0.0,
        "adapter_bytes": (adapter / "adapter_model.safetensors").stat().st_size,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(synthetic.SHAPES), default="1b", help="model shape (default 1b)")
    p.add_argument("--rank", type=int, default=64, help="extraction rank for both tools (default 64)")
    p.add_argument("--lora-rank", type=int, default=None, help="rank of the LoRA merged into the fine-tune")
    p.add_argument("--device", default="cpu", help="device for both tools (default cpu)")
    p.add_argument("--mergekit", type=Path, default=DEFAULT_MERGEKIT, help="the mergekit-extract-lora executable")
    p.add_argument("--workdir", type=Path, default=None, help="where to build the models (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    shape = synthetic.SHAPES[args.size]
    lora_rank = args.lora_rank or args.rank
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-extract-"))
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    try:
        base = synthetic.write_llama_checkpoint(work / "base", shape, progress=log)
        adapter = synthetic.write_lora_adapter(work / "lora", shape, rank=lora_rank, alpha=2 * lora_rank)
        tuned = work / "tuned"
        if not (tuned / "model.safetensors.index.json").exists() and not (tuned / "model.safetensors").exists():
            shutil.rmtree(tuned, ignore_errors=True)
            command = [sys.executable, "-m", "lora_cli", "merge", str(base), str(adapter), str(tuned), "-q"]
            subprocess.run(command, check=True, cwd=REPO_ROOT)
        results: dict[str, dict[str, Any]] = {}
        out = work / "out-loractl"
        shutil.rmtree(out, ignore_errors=True)
        loractl = [sys.executable, "-m", "lora_cli", "extract", str(base), str(tuned), str(out)]
        results["loractl"] = run_measured(
            "loractl", [*loractl, "--rank", str(args.rank), "--device", args.device, "--json"], logs
        )
        results["loractl"]["errors"] = reconstruction_errors(base, tuned, out)
        if args.mergekit.exists():
            out_mk = work / "out-mergekit"
            shutil.rmtree(out_mk, ignore_errors=True)
            command = [
                str(args.mergekit),
                "--model", str(tuned),
                "--base-model", str(base),
                "--out-path", str(out_mk),
                "--max-rank", str(args.rank),
                "--device", args.device,
                "-e", "embed_tokens", "-e", "lm_head",
                "--quiet",
            ]  # fmt: skip
            results["mergekit"] = run_measured("mergekit", command, logs)
            results["mergekit"]["errors"] = reconstruction_errors(base, tuned, out_mk)
        else:
            log(f"{args.mergekit} not found: mergekit skipped (see the module docstring to install it)")
        report = {
            "size": args.size,
            "rank": args.rank,
            "lora_rank": lora_rank,
            "device": args.device,
            "checkpoint_bytes": synthetic.checkpoint_bytes(base),
            "cpus": torch.get_num_threads(),
            "results": results,
        }
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
        print_report(report, args.markdown)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def print_report(report: dict[str, Any], markdown: bool) -> None:
    head = ["tool", "wall s", "peak anon MiB", "peak total MiB", "modules", "rel. error (all)", "worst module"]
    rows = []
    for tool, r in report["results"].items():
        e = r["errors"]
        rows.append(
            [
                tool,
                f"{r['seconds']:.1f}",
                f"{r['peak_anon_bytes'] / MiB:.0f}",
                f"{r['peak_total_bytes'] / MiB:.0f}",
                str(e["modules"]),
                f"{e['overall']:.3e}",
                f"{e['worst_module']:.3e}",
            ]
        )
    print(
        f"extract: {report['size']} (bf16 {report['checkpoint_bytes'] / 2**30:.2f} GiB), LoRA rank "
        f"{report['lora_rank']} merged in, extracted at rank {report['rank']} on {report['device']}"
    )
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
        for row in [head, *rows]:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
