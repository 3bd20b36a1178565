"""The delta-space combination methods against a direct fp64 transcription of mergekit 0.1.5's formulas
(generalized_task_arithmetic.py: merge_group and get_mask; sparsify.py: magnitude, bernoulli,
rescaled_masked_tensor), on small random tensors.

Tolerance: ours runs in fp32, the reference in fp64 on the same inputs and masks, so the results agree to fp32
rounding of a few operations per entry: rtol 1e-5 with atol 1e-6 * max|result| for entries that nearly cancel.
"""

from __future__ import annotations

import pytest
import torch

from lora_cli.combine import CombineOptions, combine_deltas, dare_generator, magnitude_mask, random_mask
from lora_cli.errors import InputError

SHAPE = (24, 40)
NAME = "model.layers.3.mlp.down_proj.weight"


def reference(deltas, weights, method, density=1.0, majority="sum", normalize=None, seed=0, name=NAME):
    """mergekit's merge_group on fp64 copies, with its masks: top-k by an argsort of |d| for magnitude, and the
    Bernoulli mask from the same generator ours uses (mergekit's own comes from torch's global RNG)."""
    consensus, sparsification, default_normalize, rescale = {
        "sum": (None, None, False, False),
        "ties": ("sum", "magnitude", True, False),
        "dare_linear": (None, "random", False, True),
        "dare_ties": ("sum", "random", False, True),
        "magnitude_prune": (None, "magnitude", False, False),
    }[method]
    normalize = default_normalize if normalize is None else normalize
    if consensus and majority == "count":
        consensus = "count"
    rows = []
    for index, delta in enumerate(deltas):
        delta = delta.double()
        if sparsification and density < 1:
            if sparsification == "magnitude":
                k = max(1, int(density * delta.numel()))
                mask = torch.zeros(delta.numel(), dtype=torch.float64)
                mask[torch.argsort(delta.abs().reshape(-1), descending=True, stable=True)[:k]] = 1
                mask = mask.reshape(delta.shape)
            else:
                generator = dare_generator(seed, index, name)
                mask = torch.bernoulli(torch.full(delta.shape, density, dtype=torch.float32), generator=generator)
                mask = mask.double()
            masked = delta * mask
            if rescale:
                before, after = delta.abs().sum(), masked.abs().sum()
                if before >= 1e-7 and after >= 1e-7:
                    masked = masked * (before / after)
            delta = masked
        rows.append(delta)
    stacked = torch.stack(rows)
    w = torch.tensor(weights, dtype=torch.float64).reshape(-1, *([1] * len(SHAPE)))
    stacked = stacked * w
    if consensus:
        sign = stacked.sign()
        if consensus == "sum":
            majority_sign = (stacked.sum(0) >= 0).double() * 2 - 1
        else:
            majority_sign = (sign.sum(0) >= 0).double() * 2 - 1
        mask = sign == majority_sign
        mixed = (stacked * mask).sum(0)
        divisor = (w * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = stacked.sum(0)
        divisor = w.sum(0)
        divisor[divisor.abs() < 1e-8] = 1
    return mixed / divisor if normalize else mixed


def random_deltas(count: int = 3, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=generator) * (0.5 + i) for i in range(count)]


def assert_matches(ours: torch.Tensor, expected: torch.Tensor) -> None:
    assert ours.dtype == torch.float32
    scale = float(expected.abs().max())
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize("method", ["sum", "ties", "dare_linear", "dare_ties", "magnitude_prune"])
@pytest.mark.parametrize("density", [1.0, 0.7, 0.2])
@pytest.mark.parametrize("majority", ["total", "frequency"])
def test_every_method_matches_mergekits_formulas_in_fp64(method, density, majority):
    deltas, weights = random_deltas(), [0.6, 0.3, -0.5]
    options = CombineOptions(method=method, density=density, majority_sign=majority, seed=11)
    ours = combine_deltas(deltas, weights, options, tensor=NAME)
    expected = reference(deltas, weights, method, density, "sum" if majority == "total" else "count", seed=11)
    assert_matches(ours, expected)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "sum"])
def test_normalize_can_be_turned_either_way(method):
    deltas, weights = random_deltas(2, seed=4), [0.8, 0.5]
    for normalize in (True, False):
        options = CombineOptions(method=method, density=0.5, normalize=normalize, seed=2)
        expected = reference(deltas, weights, method, 0.5, normalize=normalize, seed=2)
        assert_matches(combine_deltas(deltas, weights, options, tensor=NAME), expected)


def test_ties_normalized_depends_only_on_the_ratio_of_weights():
    deltas = random_deltas(2, seed=5)
    options = CombineOptions(method="ties", density=0.6)
    small = combine_deltas(deltas, [0.6, 0.4], options, tensor=NAME)
    large = combine_deltas(deltas, [3.0, 2.0], options, tensor=NAME)
    torch.testing.assert_close(small, large, rtol=1e-6, atol=1e-7)


def test_ties_elects_signs_and_averages_the_agreeing_entries():
    a = torch.tensor([[1.0, -2.0, 3.0, 0.0]])
    b = torch.tensor([[-4.0, -1.0, 1.0, 5.0]])
    out = combine_deltas([a, b], [1.0, 1.0], CombineOptions(method="ties"), tensor="t")
    # entry 0: total -3 elects "-": only b's -4 (weight 1); entry 1: both agree: (-2 - 1) / 2; entry 3: a's 0 abstains
    torch.testing.assert_close(out, torch.tensor([[-4.0, -1.5, 2.0, 5.0]]))


def test_dare_masks_are_reproducible_independent_per_adapter_and_keep_the_density():
    first = random_mask(torch.Size((300, 200)), 0.3, dare_generator(7, 0, NAME))
    again = random_mask(torch.Size((300, 200)), 0.3, dare_generator(7, 0, NAME))
    other_adapter = random_mask(torch.Size((300, 200)), 0.3, dare_generator(7, 1, NAME))
    other_tensor = random_mask(torch.Size((300, 200)), 0.3, dare_generator(7, 0, NAME + ".x"))
    other_seed = random_mask(torch.Size((300, 200)), 0.3, dare_generator(8, 0, NAME))
    assert torch.equal(first, again)
    for different in (other_adapter, other_tensor, other_seed):
        assert not torch.equal(first, different)
        # Independent draws: the overlap of two 30% masks is about 9%, not 30%.
        assert abs(float((first * different).mean()) - 0.09) < 0.01
    assert abs(float(first.mean()) - 0.3) < 0.01


def test_dare_linear_keeps_the_l1_norm_of_each_delta():
    (delta,) = random_deltas(1, seed=9)
    out = combine_deltas([delta], [1.0], CombineOptions(method="dare_linear", density=0.3, seed=1), tensor=NAME)
    assert float(out.abs().sum()) == pytest.approx(float(delta.abs().sum()), rel=1e-5)
    assert abs(float((out != 0).float().mean()) - 0.3) < 0.05


def test_magnitude_mask_breaks_ties_by_position_like_a_stable_sort():
    delta = torch.tensor([1.0, -3.0, 2.0, 3.0, -2.0, 2.0])
    # k = int(0.5 * 6) = 3: both 3s and the first 2 (position 2), as a stable descending argsort orders them.
    assert magnitude_mask(delta, 0.5).tolist() == [False, True, True, True, False, False]
    assert magnitude_mask(delta, 0.01).sum() == 1  # at least one entry survives


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"method": "slerp"}, "--combine 'slerp'"),
        ({"density": 0.0}, "--density"),
        ({"majority_sign": "x"}, "--majority"),
    ],
)
def test_bad_options_are_refused(kwargs, needle):
    with pytest.raises(InputError, match=needle):
        CombineOptions(**kwargs)
