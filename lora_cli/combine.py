"""Task-arithmetic combinations of several adapters' deltas for one tensor, as mergekit 0.1.5 defines them.

mergekit's `GeneralizedTaskArithmeticMerge` (merge_methods/generalized_task_arithmetic.py, sparsify.py) on the
deltas d_i of one tensor, with weights w_i:

1. sparsify each d_i to `density`: "magnitude" keeps the k = max(1, int(density * numel)) largest |d_i|
   (TIES, magnitude_prune), "random" keeps each entry with probability `density` (DARE); with `rescale` the kept
   entries are scaled so that the L1 norm of d_i is unchanged (DARE's default; mergekit's RescaleNorm.l1);
2. weight: e_i = w_i * d_i;
3. with a consensus (TIES, DARE-TIES), elect each entry's sign: "total" takes the sign of sum_i e_i, "frequency"
   the sign of sum_i sign(e_i) (a zero sum counts as +); keep e_i only where sign(e_i) equals it (so trimmed
   zeros never count), and divide by the sum of the kept entries' w_i when `normalize` (TIES's default; a zero
   divisor becomes 1);
4. without a consensus, sum the e_i, dividing by sum_i w_i when `normalize` (|sum| < 1e-8 becomes 1).

`magnitude_prune` is not a mergekit 0.1.5 method name: it is the same arithmetic with magnitude sparsification
and no consensus (what PEFT calls magnitude_prune). `sum` is plain task arithmetic, today's merge.

DARE's random masks come from a CPU generator seeded by (seed, adapter position, tensor name): independent masks
per adapter, the same bits on every machine and device, whatever the shard layout or the order tensors are
streamed in. (mergekit draws from torch's global generator, so only the distribution can match it.)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from lora_cli.errors import InputError

# Below these, mergekit's L1 rescale leaves the masked tensor alone (sparsify.rescaled_masked_tensor's eps).
RESCALE_EPS = 1e-7
NORMALIZE_EPS = 1e-8


@dataclass(frozen=True)
class MethodSpec:
    """One of mergekit's generalized task-arithmetic methods, as data."""

    consensus: bool
    sparsification: str | None  # "magnitude", "random" or None
    normalize: bool  # mergekit's default_normalize
    rescale: bool  # mergekit's default_rescale (L1)


METHODS: dict[str, MethodSpec] = {
    "sum": MethodSpec(consensus=False, sparsification=None, normalize=False, rescale=False),
    "ties": MethodSpec(consensus=True, sparsification="magnitude", normalize=True, rescale=False),
    "dare_linear": MethodSpec(consensus=False, sparsification="random", normalize=False, rescale=True),
    "dare_ties": MethodSpec(consensus=True, sparsification="random", normalize=False, rescale=True),
    "magnitude_prune": MethodSpec(consensus=False, sparsification="magnitude", normalize=False, rescale=False),
}
MAJORITY_SIGNS = ("total", "frequency")


@dataclass(frozen=True)
class CombineOptions:
    method: str = "sum"
    density: float = 1.0  # mergekit's default: no sparsification unless asked
    majority_sign: str = "total"
    seed: int = 0
    normalize: bool | None = None  # None: the method's default

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"--combine {self.method!r} is not one of {', '.join(METHODS)}")
        if not 0 < self.density <= 1:
            raise InputError(f"--density {self.density} must be in (0, 1]", fix="e.g. --density 0.5 keeps half")
        if self.majority_sign not in MAJORITY_SIGNS:
            raise InputError(f"--majority-sign {self.majority_sign!r} is not one of {', '.join(MAJORITY_SIGNS)}")

    @property
    def spec(self) -> MethodSpec:
        return METHODS[self.method]

    @property
    def normalized(self) -> bool:
        return self.spec.normalize if self.normalize is None else self.normalize


def dare_generator(seed: int, position: int, tensor: str) -> torch.Generator:
    """The CPU generator of one adapter's mask on one tensor: a function of its seed, position and name only."""
    digest = hashlib.sha256(f"{seed}\0{position}\0{tensor}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """True at the k = max(1, int(density * numel)) entries of largest |delta|, ties broken by position (the order
    of a stable descending argsort), found through the k-th value instead of sorting every entry."""
    flat = delta.reshape(-1).abs()
    k = max(1, int(density * flat.numel()))
    if k >= flat.numel():
        return torch.ones_like(delta, dtype=torch.bool)
    threshold = torch.kthvalue(flat.cpu() if flat.device.type == "mps" else flat, flat.numel() - k + 1).values
    mask = flat > threshold
    missing = k - int(mask.sum())
    if missing > 0:  # entries equal to the threshold, first ones first
        tied = torch.nonzero(flat == threshold).reshape(-1)[:missing]
        mask[tied] = True
    return mask.reshape(delta.shape)


def random_mask(shape: torch.Size, density: float, generator: torch.Generator) -> torch.Tensor:
    """mergekit's `torch.bernoulli(full(density))` mask, drawn from `generator` on the CPU (fp32, as on CPU)."""
    return torch.bernoulli(torch.full(tuple(shape), density, dtype=torch.float32), generator=generator)


def _rescale_l1(delta: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    before, after = delta.abs().sum(), masked.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return masked
    return masked * (before / after)


def sparsify(delta: torch.Tensor, options: CombineOptions, *, position: int, tensor: str) -> torch.Tensor:
    """Step 1 for one adapter's delta (fp32): a new tensor, `delta` untouched."""
    spec = options.spec
    if spec.sparsification is None or options.density >= 1:
        return delta
    if spec.sparsification == "magnitude":
        masked = delta * magnitude_mask(delta, options.density)
    else:
        mask = random_mask(delta.shape, options.density, dare_generator(options.seed, position, tensor))
        masked = delta * mask.to(delta.device)
    return _rescale_l1(delta, masked) if spec.rescale else masked


def combine_deltas(
    deltas: list[torch.Tensor],
    weights: list[float],
    options: CombineOptions,
    *,
    tensor: str,
    positions: list[int] | None = None,
    all_weights: list[float] | None = None,
) -> torch.Tensor:
    """The combined delta of one tensor from each adapter's unweighted fp32 delta and its weight (steps 1-4).

    `positions` are the adapters' places on the command line (for their DARE masks; default 0, 1, ...), and
    `all_weights` every adapter's weight, also those that leave this tensor alone (a zero delta): mergekit's
    normalized sum divides by all of them. A consensus never counts a zero delta, so it needs no more.
    """
    if len(deltas) != len(weights) or not deltas:
        raise ValueError("one weight per delta, and at least one delta")
    positions = list(range(len(deltas))) if positions is None else positions
    spec = options.spec
    weighted = [
        sparsify(d, options, position=p, tensor=tensor) * w for d, w, p in zip(deltas, weights, positions, strict=True)
    ]
    if spec.consensus:
        if options.majority_sign == "total":
            majority = torch.where(sum(weighted) >= 0, 1.0, -1.0)  # type: ignore[arg-type]
        else:
            votes = sum(e.sign() for e in weighted)
            majority = torch.where(votes >= 0, 1.0, -1.0)  # type: ignore[arg-type]
        mixed = torch.zeros_like(weighted[0])
        divisor = torch.zeros_like(weighted[0])
        for e, w in zip(weighted, weights, strict=True):
            agree = e.sign() == majority
            mixed += e * agree
            divisor += w * agree
        if options.normalized:
            divisor[divisor == 0] = 1
            mixed /= divisor
        return mixed
    mixed = weighted[0].clone()
    for e in weighted[1:]:
        mixed += e
    if options.normalized:
        total = sum(weights if all_weights is None else all_weights)
        mixed /= 1.0 if abs(total) < NORMALIZE_EPS else total
    return mixed
