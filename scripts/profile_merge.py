"""Where a CPU merge's compute time goes, operation by operation, on one layer of a Llama shape (no disk I/O).

For each of the seven linear modules of one layer (bf16 W, fp32 rank-r factors), times: the fp32 product
`(B @ A) * scaling` into a reused weight-sized buffer and the chunked add of that delta (`_add_in_chunks`): the
path before issue 19; the row-blocked fused add (`_add_rows`: product and add a block of rows at a time, in
cache); and the NaN/Inf check of the output. Seconds are the best of `--repeats`, scaled to all layers. Also
times starting Python and importing torch and the CLI in fresh interpreters. The read and write stages are
measured by `bench_merge.py` (`stage_seconds`).

    python scripts/profile_merge.py --size 1b --threads 2
    taskset -c 0,1 python scripts/profile_merge.py --size 1b      # a 2-core runner
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import synthetic  # noqa: E402

from lora_cli import engine  # noqa: E402
from lora_cli.adapters.base import Workspace  # noqa: E402
from lora_cli.numerics import all_finite  # noqa: E402


def best(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def startup_seconds(repeats: int) -> dict[str, float]:
    """Fresh interpreters: bare Python, `import torch`, and the CLI's imports."""
    commands = {
        "python": "pass",
        "import torch": "import torch",
        "import lora_cli.cli.app": "import lora_cli.cli.app",
    }
    out = {}
    for label, code in commands.items():
        out[label] = best(
            lambda code=code: subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT), repeats
        )
    return out


def profile_layer(shape: synthetic.LlamaShape, rank: int, repeats: int) -> dict[str, float]:
    workspace = Workspace()
    totals = {"product": 0.0, "add (chunked, whole delta)": 0.0, "fused rows": 0.0, "finite check": 0.0}
    flops = elements = 0
    generator = torch.Generator().manual_seed(0)
    for module in synthetic.ALL_LINEAR:
        rows, cols = shape.linear_shape(module)
        weight = (torch.randn(rows, cols, generator=generator) * 0.02).to(torch.bfloat16)
        a = torch.randn(rank, cols, generator=generator) * 0.01
        b = torch.randn(rows, rank, generator=generator) * 0.01
        out = torch.empty_like(weight)
        delta = torch.empty(rows, cols)
        flops += 2 * rows * cols * rank
        elements += rows * cols

        def product(delta: torch.Tensor = delta, a: torch.Tensor = a, b: torch.Tensor = b) -> None:
            torch.matmul(b, a, out=delta).mul_(2.0)

        def row_delta(
            start: int, stop: int, into: torch.Tensor, a: torch.Tensor = a, b: torch.Tensor = b
        ) -> torch.Tensor:
            return torch.matmul(b[start:stop], a, out=into).mul_(2.0)

        totals["product"] += best(product, repeats)
        totals["add (chunked, whole delta)"] += best(
            lambda w=weight, d=delta, o=out: engine._add_in_chunks(w, [d], o, torch.float32), repeats
        )
        totals["fused rows"] += best(
            lambda w=weight, o=out, r=row_delta: engine._add_rows(w, [r], o, torch.float32, workspace), repeats
        )
        totals["finite check"] += best(lambda o=out: all_finite(o), repeats)
    scaled = {k: v * shape.layers for k, v in totals.items()}
    scaled["before: product + add"] = scaled["product"] + scaled["add (chunked, whole delta)"]
    scaled["GFLOP (products)"] = flops * shape.layers / 1e9
    scaled["G elements (adds)"] = elements * shape.layers / 1e9
    return scaled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(synthetic.SHAPES), default="1b")
    parser.add_argument("--layers-mult", type=int, default=1)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--threads", type=int, nargs="*", help="torch thread counts to try (default: torch's own)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    shape = synthetic.SHAPES[args.size].with_layers_mult(args.layers_mult)
    report: dict[str, object] = {"size": args.size, "layers": shape.layers, "default_threads": torch.get_num_threads()}
    report["startup_s"] = startup_seconds(args.repeats)
    runs = {}
    for threads in args.threads or [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        runs[threads] = profile_layer(shape, args.rank, args.repeats)
    report["compute_s_by_threads"] = runs
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
