"""The truncated SVDs under extract, resize and combine, against fp64 exact SVDs."""

from __future__ import annotations

import pytest
import torch

from lora_cli.lowrank import Truncation, factored_svd, relative_error, truncated_svd


def spectrum_matrix(rows: int, cols: int, singular: torch.Tensor, seed: int) -> torch.Tensor:
    """A matrix with the given singular values (random orthogonal vectors), built in fp64."""
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, singular.numel(), generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, singular.numel(), generator=generator, dtype=torch.float64))
    return (u * singular) @ v.T


def exact_error(delta: torch.Tensor, k: int) -> float:
    s = torch.linalg.svdvals(delta.double())
    return float((s[k:] ** 2).sum().sqrt() / (s**2).sum().sqrt())


def test_randomized_svd_of_a_large_matrix_is_within_one_percent_of_the_exact_error():
    # A slowly decaying spectrum, as a fine-tune's delta has: the hard case for a sketch.
    singular = 1.0 / torch.arange(1, 301, dtype=torch.float64) ** 0.5
    delta = spectrum_matrix(500, 400, singular, seed=0).float()
    low = truncated_svd(delta, Truncation(rank=16), seed=7, exact_max_side=64)
    assert low.method == "randomized" and low.a.shape == (16, 400) and low.b.shape == (500, 16)
    assert relative_error(delta, low) <= exact_error(delta, 16) * 1.01
    again = truncated_svd(delta, Truncation(rank=16), seed=7, exact_max_side=64)
    assert torch.equal(low.a, again.a) and torch.equal(low.b, again.b)  # seeded: the same on every run


def test_exact_svd_on_small_matrices_matches_fp64():
    delta = spectrum_matrix(200, 300, torch.linspace(3, 0.1, 150, dtype=torch.float64), seed=1).float()
    low = truncated_svd(delta, Truncation(rank=10), seed=0)
    assert low.method == "exact"
    assert relative_error(delta, low) == pytest.approx(exact_error(delta, 10), rel=1e-4)
    kept = float((torch.linalg.svdvals(delta.double())[:10] ** 2).sum() / (delta.double() ** 2).sum())
    assert low.energy_kept == pytest.approx(kept, rel=1e-5)


def test_energy_picks_the_least_rank_reaching_it_even_past_the_first_sketch():
    singular = torch.cat([torch.full((100,), 1.0), torch.full((500,), 0.01)]).double()
    delta = spectrum_matrix(900, 700, singular, seed=2).float()
    low = truncated_svd(delta, Truncation(energy=0.99), seed=3, exact_max_side=64)  # rank 100 > first sketch (64)
    assert low.method == "randomized" and low.a.shape[0] == 100 and low.energy_kept >= 0.99
    capped = truncated_svd(delta, Truncation(energy=0.99, max_rank=40), seed=3, exact_max_side=64)
    assert capped.a.shape[0] == 40


def test_factored_svd_equals_the_svd_of_the_product_without_forming_it():
    generator = torch.Generator().manual_seed(4)
    b = torch.randn(300, 16, generator=generator, dtype=torch.float64)
    a = torch.randn(16, 200, generator=generator, dtype=torch.float64)
    low = factored_svd(b, a, Truncation(rank=6))
    u, s, vh = torch.linalg.svd(b @ a)
    best = (u[:, :6] * s[:6]) @ vh[:6]
    torch.testing.assert_close(low.b @ low.a, best, rtol=0, atol=1e-11 * float(s[0]))
    torch.testing.assert_close(low.singular, s[:6], rtol=1e-12, atol=0)
    assert low.energy_kept == pytest.approx(float((s[:6] ** 2).sum() / (s**2).sum()), rel=1e-12)
