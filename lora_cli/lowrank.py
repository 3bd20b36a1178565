"""Truncated SVDs for extract, resize and combine: of a full delta, or of a delta given as factors B @ A.

A full delta gets an exact SVD when it is small, and a randomized one (torch.svd_lowrank, a Halko sketch with
power iterations) when it is large. The randomized sketch is seeded per tensor, so the same input gives the
same adapter on every run. A factored delta B @ A is never formed: QR of both factors leaves an r x r core
whose SVD gives the exact singular values and vectors of B @ A.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from lora_cli.errors import InputError

# Exact SVD when the smaller side is at most this, or the sketch would cover a third of it anyway: an exact
# LAPACK SVD of a 1024-wide matrix costs less than the sketch's passes over a large one.
EXACT_MAX_SIDE = 1024
# Randomized: oversampling beyond the rank and subspace iterations. Halko et al. (2011) find 5-10 extra columns
# and 1-2 iterations enough for a decaying spectrum; fine-tune deltas decay slowly, so more of both. With these
# the error of the kept rank is within 1% of the exact SVD's on the synthetic fine-tunes measured in README.
OVERSAMPLE_MIN = 16
POWER_ITERATIONS = 6
# --energy on a large matrix: sketch this many columns first and double while the kept energy is short.
ENERGY_FIRST_SKETCH = 64


# The dtypes written adapter factors may be stored in (`--dtype` of extract, resize and combine).
FACTOR_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def factor_dtype(name: str) -> torch.dtype:
    if name not in FACTOR_DTYPES:
        raise InputError(f"--dtype {name!r} is not one of {', '.join(FACTOR_DTYPES)}")
    return FACTOR_DTYPES[name]


@dataclass(frozen=True)
class Truncation:
    """How to choose the kept rank: a fixed rank, or the least rank keeping `energy` of sum(s^2); `max_rank` caps."""

    rank: int | None = None
    energy: float | None = None
    max_rank: int | None = None

    def check(self) -> None:
        """Refuse options that choose no rank (or two ways at once), naming the option."""
        if (self.rank is None) == (self.energy is None):
            raise InputError("give exactly one of --rank and --energy")
        if self.rank is not None and self.rank < 1:
            raise InputError(f"--rank {self.rank} must be at least 1")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise InputError(
                f"--energy {self.energy} must be in (0, 1]", fix="e.g. --energy 0.9 keeps 90% of each delta"
            )
        if self.max_rank is not None and self.max_rank < 1:
            raise InputError(f"--max-rank {self.max_rank} must be at least 1")

    def choose(self, singular: torch.Tensor, total_energy: float) -> int:
        """The kept rank for these singular values (descending) of a delta of squared norm `total_energy`."""
        limit = singular.numel()
        if self.max_rank is not None:
            limit = min(limit, self.max_rank)
        if self.rank is not None:
            return max(1, min(self.rank, limit))
        assert self.energy is not None
        if total_energy <= 0:
            return 1
        cumulative = torch.cumsum(singular.double() ** 2, 0) / total_energy
        reached = torch.nonzero(cumulative >= self.energy - 1e-12)
        needed = int(reached[0]) + 1 if reached.numel() else singular.numel()
        return max(1, min(needed, limit))

    @property
    def sketch_rank(self) -> int | None:
        """The rank a randomized sketch must resolve, when known before looking at the spectrum."""
        if self.rank is not None:
            return self.rank if self.max_rank is None else min(self.rank, self.max_rank)
        return None


@dataclass(frozen=True)
class TruncatedSvd:
    """delta ~ b @ a with a [k, in] and b [out, k], the singular values split evenly (sqrt on each side)."""

    a: torch.Tensor
    b: torch.Tensor
    singular: torch.Tensor  # the k kept singular values
    energy_kept: float  # sum of kept s^2 over the delta's squared Frobenius norm
    method: str  # "exact", "randomized" or "factored"


def tensor_seed(name: str) -> int:
    """A stable 63-bit seed from a tensor's name (Python's hash() changes from run to run)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") >> 1


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    root = s[:k].sqrt()
    return vh[:k] * root[:, None], u[:, :k] * root


def _randomized(delta: torch.Tensor, q: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    devices = [delta.device] if delta.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(delta, q=q, niter=POWER_ITERATIONS)
    return u, s, v.T


def truncated_svd(
    delta: torch.Tensor, how: Truncation, *, seed: int, exact_max_side: int = EXACT_MAX_SIDE
) -> TruncatedSvd:
    """Best rank-k factors of a 2-D fp32 delta (k from `how`), exact up to `exact_max_side`, else randomized."""
    rows, cols = delta.shape
    side = min(rows, cols)
    total = float(torch.linalg.vector_norm(delta)) ** 2 if delta.numel() else 0.0
    wanted = how.sketch_rank
    if wanted is not None:
        q = min(side, wanted + max(OVERSAMPLE_MIN, wanted // 2))
        exact = side <= exact_max_side or 3 * q >= side
    else:
        q = min(side, ENERGY_FIRST_SKETCH)
        exact = side <= exact_max_side
    if not exact:
        while True:
            u, s, vh = _randomized(delta, q, seed)
            k = how.choose(s, total)
            # Enough when the chosen rank leaves the oversampling columns unused (their values are the least
            # accurate) or when the sketch already covers a third of the matrix.
            if k + OVERSAMPLE_MIN <= q or (how.max_rank is not None and k >= how.max_rank):
                a, b = _split(u, s, vh, k)
                kept = float((s[:k].double() ** 2).sum() / total) if total > 0 else 1.0
                return TruncatedSvd(a, b, s[:k].clone(), kept, "randomized")
            if 3 * 2 * q >= side:
                break
            q *= 2
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = how.choose(s, total)
    a, b = _split(u, s, vh, k)
    kept = float((s[:k].double() ** 2).sum() / total) if total > 0 else 1.0
    return TruncatedSvd(a.contiguous(), b.contiguous(), s[:k].clone(), kept, "exact")


def factored_svd(b: torch.Tensor, a: torch.Tensor, how: Truncation) -> TruncatedSvd:
    """Best rank-k factors of b @ a (b [out, r], a [r, in]) without forming it: b = Qb Rb, a.T = Qa Ra, so
    b @ a = Qb (Rb Ra.T) Qa.T and the SVD of the r x r core gives those of the product exactly."""
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    total = float((s.double() ** 2).sum())
    k = how.choose(s, total)
    root = s[:k].sqrt()
    new_b = (qb @ u[:, :k]) * root
    new_a = (vh[:k] @ qa.T) * root[:, None]
    kept = float((s[:k].double() ** 2).sum() / total) if total > 0 else 1.0
    return TruncatedSvd(new_a.contiguous(), new_b.contiguous(), s[:k].clone(), kept, "factored")


def relative_error(delta: torch.Tensor, low: TruncatedSvd, *, rows_per_chunk: int = 1024) -> float:
    """||delta - b @ a|| / ||delta|| (Frobenius), by row blocks so that no second delta-sized tensor exists."""
    total = float(torch.linalg.vector_norm(delta)) ** 2
    if total == 0:
        return 0.0
    residual = 0.0
    for start in range(0, delta.shape[0], rows_per_chunk):
        block = delta[start : start + rows_per_chunk] - low.b[start : start + rows_per_chunk] @ low.a
        residual += float(torch.linalg.vector_norm(block)) ** 2
    return math.sqrt(residual / total)
