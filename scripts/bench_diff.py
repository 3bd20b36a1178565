"""Benchmark ``loractl diff`` on two synthetic checkpoints: wall time and peak memory stay flat with size.

Builds a synthetic Llama-shaped bf16 checkpoint A and a rank-64 LoRA on all seven linear modules (see
``synthetic.py``), makes B with ``loractl merge A LORA B``, then runs ``loractl diff A B --json`` (and, with
``--adapter-check``, ``--adapter LORA``) as a subprocess. Memory is sampled from ``/proc/<pid>/status`` of the
process tree by ``bench_merge``'s sampler, keeping anonymous memory (what the diff allocates) apart from
file-backed pages. Everything it wrote is deleted at the end unless ``--keep``.

Examples::

    python scripts/bench_diff.py --size tiny                 # quick end-to-end check
    python scripts/bench_diff.py --size 1b --adapter-check   # the README line
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_merge  # a sibling module: its process-tree sampler and loractl launcher are reused
import synthetic

MiB = 1 << 20


def build(
    workdir: Path, shape: synthetic.LlamaShape, rank: int, loractl: list[str], env: dict[str, str]
) -> tuple[Path, Path, Path]:
    """A (synthetic base), the LoRA, and B = loractl merge of the two; reused when already there."""
    a = synthetic.write_llama_checkpoint(workdir / "a", shape, torch.bfloat16, progress=bench_merge.log)
    lora = synthetic.write_lora_adapter(workdir / "lora", shape, rank=rank, alpha=2 * rank)
    b = workdir / "b"
    if not b.exists():
        bench_merge.log(f"merging {a} + {lora} -> {b}")
        argv = [*loractl, "merge", str(a), str(lora), str(b), "--device", "cpu", "--quiet"]
        subprocess.run(argv, check=True, env={**os.environ, **env})
    return a, lora, b


def measure(name: str, argv: list[str], env: dict[str, str], b: Path, logs: Path) -> dict:
    method = bench_merge.Method(name, lambda _out: argv, env, parse_json=True)
    run = bench_merge.run_measured(method, b, 0, logs, timeout=None)
    if run.returncode not in (0, 1):
        raise SystemExit(f"{name} failed with exit code {run.returncode}:\n{run.stderr_tail}")
    report = run.report or {}
    check = report.get("adapter_check") or {}
    return {
        "method": name,
        "exit_code": run.returncode,
        "wall_s": round(run.wall_s, 2),
        "peak_rss_anon_mib": round(run.peaks.anon / MiB, 1),
        "peak_rss_file_mib": round(run.peaks.file / MiB, 1),
        "bytes_compared": report.get("bytes_read"),
        "summary": report.get("summary"),
        "verdict": check.get("verdict"),
        "max_ulps": check.get("max_ulps"),
    }


def result_line(size: str, rank: int, row: dict, cores: int | None) -> str:
    """One line per run, as README quotes it."""
    gb = (row["bytes_compared"] or 0) / 1e9
    summary = row["summary"] or {}
    what = f"{summary.get('changed', '?')} changed, {summary.get('identical', '?')} identical"
    verdict = f", verdict {row['verdict']} (max {row['max_ulps']:g} ulps)" if row["verdict"] else ""
    return (
        f"{row['method']}: two {size} bf16 checkpoints ({gb:.2f} GB read, rank-{rank} LoRA merge: {what}{verdict}): "
        f"{row['wall_s']:.1f} s, peak RssAnon {row['peak_rss_anon_mib']:.0f} MiB "
        f"(file-backed {row['peak_rss_file_mib']:.0f} MiB), {cores} cores"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(synthetic.SHAPES), default="1b")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument(
        "--layers-mult", type=int, default=1, help="N times the layers: peak memory must not grow (flat memory)"
    )
    parser.add_argument("--workdir", type=Path, help="where to build the checkpoints (default: a temp folder)")
    parser.add_argument("--adapter-check", action="store_true", help="also time diff --adapter LORA")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--loractl", help="command to run loractl (default: installed, else python -m lora_cli)")
    args = parser.parse_args(argv)

    parent = bench_merge.default_workdir_parent()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="loractl-bench-diff-", dir=parent))
    workdir.mkdir(parents=True, exist_ok=True)
    loractl, env = bench_merge.loractl_command(args.loractl)
    rows = []
    try:
        shape = synthetic.SHAPES[args.size].with_layers_mult(args.layers_mult)
        a, lora, b = build(workdir, shape, args.rank, loractl, env)
        logs = workdir / "logs"
        logs.mkdir(exist_ok=True)
        runs = [("diff", [*loractl, "diff", str(a), str(b), "--json"])]
        if args.adapter_check:
            runs.append(("diff --adapter", [*loractl, "diff", str(a), str(b), "--adapter", str(lora), "--json"]))
        for name, command in runs:
            bench_merge.log(f"running {name}")
            rows.append(measure(name, command, env, b, logs))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    cores = os.cpu_count()
    size = args.size if args.layers_mult == 1 else f"{args.size} x{args.layers_mult} layers"
    for row in rows:
        print(result_line(size, args.rank, row, cores))
    if args.json:
        args.json.write_text(json.dumps({"machine": bench_merge.machine_info(), "runs": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
