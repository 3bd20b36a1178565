"""Check lora_cli.combine against mergekit 0.1.5's own `merge_group`, run where mergekit is installed.

mergekit is not a dependency (it pins and pulls much); install it where it cannot touch the main environment::

    python -m venv --system-site-packages /tmp/mkvenv
    /tmp/mkvenv/bin/pip install mergekit==0.1.5
    /tmp/mkvenv/bin/python scripts/check_combine_vs_mergekit.py

For the deterministic methods (task_arithmetic = sum, ties) it prints the largest difference from mergekit in
units of the base's magnitude (mergekit returns base + delta in fp32, so its delta carries that rounding); for the
DARE methods, whose masks mergekit draws from torch's global generator, the share of kept entries and the L1 norms.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mergekit.merge_methods import registry
from mergekit.merge_methods.base import TensorEntry, TensorGroup

from lora_cli.combine import CombineOptions, combine_deltas

EPS32 = torch.finfo(torch.float32).eps


def main() -> None:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(64, 48, generator=generator)
    deltas = [torch.randn(64, 48, generator=generator) * s for s in (0.5, 1.0, 1.5)]
    weights = [0.6, 0.3, -0.5]
    for name, ours_name in [("task_arithmetic", "sum"), ("ties", "ties"), ("dare_linear", None), ("dare_ties", None)]:
        for density in (1.0, 0.7, 0.3):
            entries = [TensorEntry("base", base, is_base=True)]
            entries += [TensorEntry(f"m{i}", base + d) for i, d in enumerate(deltas)]
            parameters = {
                "int8_mask": False,
                "normalize": name == "ties",
                "rescale": name.startswith("dare"),
                "lambda": 1.0,
                "weight": {f"m{i}": w for i, w in enumerate(weights)},
                "density": {f"m{i}": density for i in range(len(deltas))},
            }
            torch.manual_seed(0)
            theirs = registry.get(name).merge_group(TensorGroup(entries), **parameters) - base
            method = ours_name or name
            ours = combine_deltas(deltas, weights, CombineOptions(method=method, density=density), tensor="t")
            if ours_name is not None:
                worst = float((ours - theirs).abs().max()) / float(base.abs().max()) / EPS32
                print(f"{name:16} density {density}: max |ours - mergekit| = {worst:.1f} eps32 * max|base|")
            else:
                kept = float((ours != 0).float().mean()), float((theirs != 0).float().mean())
                norms = float(ours.abs().sum()), float(theirs.abs().sum())
                print(
                    f"{name:16} density {density}: kept share {kept[0]:.3f} vs {kept[1]:.3f}, "
                    f"L1 {norms[0]:.1f} vs {norms[1]:.1f}"
                )


if __name__ == "__main__":
    main()
