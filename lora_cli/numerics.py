"""Error in units in the last place, counted the honest way for merges; and a cheap check for NaN and Inf.

A merged value W + delta is rounded at its own magnitude, so an error is only meaningful in ulps of the larger
of the two values compared: counted at a value near zero, one rounding step of a large neighbour looks like
thousands of ulps.
"""

from __future__ import annotations

import torch

# Elements compared per step: bounds the fp32/fp64 temporaries to a few tens of MiB whatever the tensor size.
CHUNK = 1 << 20


def ulp_at(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` at each |x| (normal range), in fp32 (fp64 for fp64): exact, as it is a power of two.

    frexp rather than log2 and pow: far cheaper on large tensors, and free of log2's rounding at powers of two.
    """
    info = torch.finfo(dtype)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    _, exponent = torch.frexp(x.to(work).abs().clamp_min(info.smallest_normal))
    return torch.ldexp(torch.full_like(x, info.eps, dtype=work), exponent - 1)


def ulps(
    a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype | None = None, at: torch.Tensor | None = None
) -> torch.Tensor:
    """|a - b| in ulps of `dtype` (default a's) at max(|a|, |b|, |at|), as float64.

    `at` adds the operands' magnitudes: for W + delta, a rounding of the delta is an error of its own size,
    which can be many ulps of a result that nearly cancelled.
    """
    dtype = dtype or a.dtype
    a64, b64 = a.double(), b.double()
    larger = torch.maximum(a64.abs(), b64.abs())
    if at is not None:
        larger = torch.maximum(larger, at.double().abs())
    return (a64 - b64).abs() / ulp_at(larger, dtype).double()


def max_ulps(
    a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype | None = None, at: torch.Tensor | None = None
) -> float:
    return float(ulps(a, b, dtype, at).max()) if a.numel() else 0.0


def all_finite(tensor: torch.Tensor) -> bool:
    """NaN and Inf show up in the min or the max (both propagate NaN); one pass, much cheaper than isfinite()."""
    if tensor.numel() == 0 or not tensor.is_floating_point():
        return True
    if tensor.element_size() == 1:  # FP8 has no aminmax kernel; fp16 holds every FP8 value exactly
        return bool(torch.isfinite(tensor.to(torch.float16)).all())
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def work_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """fp32, or fp64 when either side is fp64 (or an integer type that fp32 cannot hold exactly)."""
    wide = (torch.float64, torch.int64, torch.int32)
    return torch.float64 if any(d in wide for d in dtypes) else torch.float32


def coarser(a: torch.dtype, b: torch.dtype) -> torch.dtype | None:
    """The less precise of two float dtypes (both are compared at its precision), None if either is not float."""
    if not (a.is_floating_point and b.is_floating_point):
        return None
    return a if torch.finfo(a).eps >= torch.finfo(b).eps else b
