"""`diff`'s per-tensor statistics against a direct torch computation, where the chunked fast path could slip.

The statistics are taken over 1M-element chunks (`numerics.CHUNK`), unequal elements are counted on the bits of
A - B and equality is tested with memcmp: each test here spans several chunks and puts the values that tell a value
comparison from a bit comparison (-0.0 against 0.0, NaN against NaN, an element in the last, short chunk) where the
fast path must see them. The counts, the largest difference (A - B in float32, diff's working precision) and the
allclose flag are exact (no tolerance); the norms and the cosine are float32 sums of a million products each, in
another order than the float64 reference's, so they are checked to a relative 1e-4 (the rounding of such a sum
stays well inside it), far below the change one element more or less would make here (rel_frobenius moves by
more than 1e-2).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lora_cli.diff import DiffOptions, bits_equal, diff
from lora_cli.numerics import CHUNK
from lora_cli.sources import local_source


def _save(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors")
    return folder


def _reference(a: torch.Tensor, b: torch.Tensor) -> dict[str, float | bool]:
    """The statistics as their definitions read: values compared (NaN equal to NaN, -0.0 to 0.0); the largest
    difference in float32, the norms in float64."""
    a32, b32 = a.float().reshape(-1), b.float().reshape(-1)
    both_nan = a32.isnan() & b32.isnan()
    unequal = ~((a32 == b32) | both_nan)
    d = (a32 - b32).masked_fill(~unequal, 0.0).nan_to_num(nan=math.inf, posinf=math.inf, neginf=-math.inf)
    return {
        "frac_differ": int(unequal.sum()) / a32.numel(),
        "max_abs_diff": float(d.abs().max()),
        "allclose": bool(torch.allclose(a, b, equal_nan=True)),
        "rel_frobenius": float(d.double().norm() / a32.double().norm()),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_unequal_elements_are_counted_by_value_across_chunks(tmp_path: Path, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    n = 2 * CHUNK + 1000  # two full chunks and a short one
    a = torch.randn(n).to(dtype)
    a[:300] = 0.0
    a[CHUNK : CHUNK + 200] = -0.0
    b = a.clone()
    b[:100] = -0.0  # the same value, other bits: not a difference
    b[CHUNK : CHUNK + 50] = 0.0
    b[500:510] += 1.0  # a real difference in each chunk, so that none of them is skipped as equal
    b[CHUNK + 300] += 1.0
    b[n - 3] += 2.0  # in the last, short chunk
    result = diff(local_source(_save(tmp_path / "a", {"w": a})), local_source(_save(tmp_path / "b", {"w": b})))
    record = result.tensors[0]
    expected = _reference(a, b)
    assert record.status == "changed"
    assert record.frac_differ == expected["frac_differ"] == 12 / n
    assert record.max_abs_diff == expected["max_abs_diff"]
    assert record.allclose is expected["allclose"] is False
    assert record.rel_frobenius == pytest.approx(expected["rel_frobenius"], rel=1e-4)
    assert record.cosine == pytest.approx(float(torch.cosine_similarity(a.double(), b.double(), dim=0)), rel=1e-4)


def test_signed_zeros_and_nan_pairs_are_equal_and_nan_against_a_number_is_not(tmp_path: Path) -> None:
    torch.manual_seed(1)
    n = CHUNK + 4096
    a = torch.randn(n)
    a[7], a[CHUNK + 9], a[20] = math.nan, math.nan, -0.0
    b = a.clone()
    b[20] = 0.0
    only_zeros = {"w": a.clone()}, {"w": b.clone()}  # NaN where the other has NaN, -0.0 against 0.0: identical
    b[CHUNK + 100] = math.nan  # a NaN against a number: infinitely far
    b[CHUNK + 200] += 0.5
    zeros_a, zeros_b = _save(tmp_path / "a0", only_zeros[0]), _save(tmp_path / "b0", only_zeros[1])
    same = diff(local_source(zeros_a), local_source(zeros_b))
    assert same.tensors[0].status == "identical" and same.tensors[0].frac_differ == 0.0
    result = diff(local_source(_save(tmp_path / "a", {"w": a})), local_source(_save(tmp_path / "b", {"w": b})))
    record, expected = result.tensors[0], _reference(a, b)
    assert record.status == "changed" and record.allclose is False
    assert record.frac_differ == expected["frac_differ"] == 2 / n
    assert record.max_abs_diff == expected["max_abs_diff"] == math.inf


def test_tolerance_is_tested_chunk_by_chunk_until_one_fails(tmp_path: Path) -> None:
    torch.manual_seed(2)
    n = 3 * CHUNK
    a = torch.randn(n)
    within = a * (1 + 1e-7)  # inside rtol=1e-5 everywhere
    beyond = within.clone()
    beyond[2 * CHUNK + 5] += 1e-3  # beyond it in the third chunk only
    options = DiffOptions()
    close = diff(local_source(_save(tmp_path / "a", {"w": a})), local_source(_save(tmp_path / "b", {"w": within})))
    far = diff(local_source(tmp_path / "a"), local_source(_save(tmp_path / "c", {"w": beyond})), options)
    assert close.tensors[0].status == "identical" and close.tensors[0].allclose is True
    assert close.tensors[0].frac_differ == _reference(a, within)["frac_differ"] > 0.5
    assert far.tensors[0].status == "changed" and far.tensors[0].allclose is False


def _as_ints(t: torch.Tensor) -> np.ndarray:
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().reshape(-1).view(ints).numpy()


PAIRS = {
    "same": lambda x: (x, x.clone()),
    "last byte": lambda x: (x, torch.cat([x[:-1], x[-1:] + 1])),
    "first element": lambda x: (x, torch.cat([x[:1] + 1, x[1:]])),
    "signed zero": lambda x: (torch.zeros(5, dtype=x.dtype), -torch.zeros(5, dtype=x.dtype)),
    "nan bits": lambda x: (torch.full((9,), math.nan if x.is_floating_point() else 7, dtype=x.dtype),) * 2,
    "transposed view": lambda x: (x.reshape(4, -1).t(), x.reshape(4, -1).t().contiguous()),
    "other shape": lambda x: (x, x.reshape(4, -1)),
    "other dtype": lambda x: (x, x.double()),
    "empty": lambda x: (x[:0], x[:0].clone()),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.uint8], ids=str)
@pytest.mark.parametrize("case", list(PAIRS))
def test_bits_equal_compares_bytes_as_integer_views_do(case: str, dtype: torch.dtype) -> None:
    x = (torch.arange(4096) % 251).to(dtype)
    a, b = PAIRS[case](x)
    expected = a.dtype == b.dtype and a.shape == b.shape and bool(np.array_equal(_as_ints(a), _as_ints(b)))
    assert bits_equal(a, b) is expected
    assert bits_equal(b, a) is expected


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_tensors_compare_without_an_internal_error(tmp_path: Path, fp8: torch.dtype) -> None:
    """torch has no aminmax for float8: a bit-identical float8 pair is still identical, a changed one changed."""
    torch.manual_seed(2)
    a = torch.randn(CHUNK + 5).to(fp8)
    b = a.clone()
    b[-1] = 0.0 if float(a[-1]) != 0 else 1.0
    same = diff(local_source(_save(tmp_path / "a", {"w": a})), local_source(_save(tmp_path / "a2", {"w": a})))
    assert same.tensors[0].status == "identical" and same.tensors[0].cosine == 1.0
    changed = diff(local_source(tmp_path / "a"), local_source(_save(tmp_path / "b", {"w": b})))
    assert changed.tensors[0].status == "changed" and changed.tensors[0].frac_differ == 1 / a.numel()


def test_an_infinity_is_close_only_to_itself(tmp_path: Path) -> None:
    """As torch.isclose: inf against -inf (or a number) is a change however loose the tolerance; inf against inf
    is equal."""
    a = torch.tensor([math.inf, 1.0, -math.inf])
    folder = _save(tmp_path / "a", {"w": a})
    for other, status in [
        ([math.inf, 1.0, -math.inf], "identical"),
        ([-math.inf, 1.0, -math.inf], "changed"),
        ([math.inf, 1.0, 5.0], "changed"),
        ([5.0, 1.0, -math.inf], "changed"),
    ]:
        b = torch.tensor(other)
        result = diff(local_source(folder), local_source(_save(tmp_path / f"b{other}", {"w": b})))
        record = result.tensors[0]
        assert record.status == status, (other, record)
        assert record.allclose is (status == "identical") == torch.allclose(a, b)
        assert record.max_abs_diff == (0.0 if status == "identical" else math.inf)  # not float32's largest


@pytest.mark.parametrize("how", ["rewritten", "renamed_over"])
def test_a_checkpoint_changed_while_diff_reads_it_is_refused(tmp_path: Path, how: str) -> None:
    """As the merge does (io/files.py): reads go through the descriptor opened first, and before the report the
    path must still name that same, unmodified file; else exit 2 naming it, not a report of neither version."""
    from lora_cli.errors import InputError

    a = _save(tmp_path / "a", {"x": torch.ones(8), "y": torch.zeros(8)})
    b = _save(tmp_path / "b", {"x": torch.ones(8), "y": torch.ones(8)})
    victim = b / "model.safetensors"
    replacement = (a / "model.safetensors").read_bytes() + b" "  # another file: the size differs too
    changed = []

    def swap_once(_: int) -> None:
        if changed:
            return
        changed.append(True)
        if how == "renamed_over":
            (b / "incoming").write_bytes(replacement)
            (b / "incoming").rename(victim)
        else:
            with open(victim, "r+b") as handle:
                handle.write(replacement)

    with pytest.raises(InputError, match=r"(was modified|was replaced) while loractl was reading it") as error:
        diff(local_source(a), local_source(b), progress=swap_once)
    assert error.value.path == str(victim)
