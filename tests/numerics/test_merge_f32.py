"""The float32 speed path of the merge gives the float64 path's bits, every time.

Oracle: ``add_lowrank_float64``, the merge as it was before the speed path
(float64 row blocks, certified, Fraction fallback), kept unchanged for this.
Cases: hypothesis over shapes, scales, magnitudes spanning the exponent range
(zeros, subnormals, near-overflow), adapters in float32/bfloat16/float64;
constructed rounding midpoints; special values (signed zeros, Inf, NaN); rows
longer than a sub-block; fan_in_fan_out through the shard writer; and a
deliberately broken certification that these tests must catch.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reflora
from reflora.numerics import merge_f32
from reflora.numerics.merge import add_lowrank_float64, add_lowrank_f32

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
DTYPES = {"bfloat16": BF16, "float16": F16}


def bits(a):
    return np.ascontiguousarray(a).view(np.uint16)


def assert_same(got, ref, what=""):
    diff = np.flatnonzero(bits(got) != bits(ref))
    assert diff.size == 0, (f"{what}: {diff.size} elements differ, e.g. flat index {diff[:5]}: "
                            f"{got.reshape(-1)[diff[:5]]} vs {ref.reshape(-1)[diff[:5]]}")


@st.composite
def problems(draw):
    dt = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    O, I, R = draw(st.integers(1, 24)), draw(st.integers(1, 40)), draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    w_exp = draw(st.sampled_from([-30, -12, -5, 0, 3, 8]))  # float16 overflows above 2^16; bf16 keeps going
    w = rng.standard_normal((O, I)) * 2.0 ** w_exp
    zeros = rng.random((O, I)) < draw(st.sampled_from([0.0, 0.2]))
    w[zeros] = 0.0
    w = w.astype(dt)
    ab = draw(st.sampled_from([np.float32, BF16, np.float64]))
    upd = 2.0 ** draw(st.sampled_from([-20, -8, -4, 0, 2]))
    A = rng.uniform(-1, 1, (R, I)).astype(ab).astype(np.float64)
    B = (rng.standard_normal((O, R)) * upd).astype(ab).astype(np.float64)
    s = draw(st.sampled_from([2.0, 0.5, -1.0, 1 / 3, 8 / np.sqrt(12), 1e-3]))
    return w, A, B, float(s)


@given(problems())
def test_float32_path_gives_the_float64_bits(p):
    w, A, B, s = p
    ref = add_lowrank_float64(w, A, B, s)
    got = add_lowrank_f32(w, A, B, s)
    if got is not None:  # None: the path declined (a sign-of-zero or non-finite case) and float64 runs
        assert_same(got, ref, f"{w.dtype} {w.shape} R={A.shape[0]} s={s}")
    assert_same(reflora.merge(w, A, B, scale=s).weight, ref, "reflora.merge")


@pytest.mark.parametrize("dt", sorted(DTYPES))
def test_typical_layer_takes_the_fast_path_with_few_candidates(dt):
    """A rank-16 update of a std-0.02 weight: the path applies and recomputes < 1% of the elements."""
    dt = DTYPES[dt]
    rng = np.random.default_rng(0)
    O, I, R = 300, 1000, 16
    w = (rng.standard_normal((O, I)) * 0.02).astype(dt)
    A = rng.uniform(-1, 1, (R, I)).astype(np.float32).astype(np.float64) / np.sqrt(I)
    B = (rng.standard_normal((O, R)) * 1e-3).astype(np.float32).astype(np.float64)
    plan = merge_f32.Plan(dt, B, A, 2.0)
    assert plan.ok
    out = np.empty_like(w)
    work = merge_f32.work_arrays(np, O * I)
    idx = plan.block(np, 0, w.view(np.uint16), out.view(np.uint16), work)
    assert 0 < idx.size < 0.01 * w.size, idx.size
    plan.fix(0, w, out.view(np.uint16), idx)
    assert_same(out, add_lowrank_float64(w, A, B, 2.0))


@pytest.mark.parametrize("dt", sorted(DTYPES))
def test_constructed_midpoints(dt):
    """W + s B A on, or within 2^-30 / 2^-40 relative of, a rounding midpoint (float32 r cannot tell them apart)."""
    dt = DTYPES[dt]
    p = 8 if dt == BF16 else 11
    deltas = [0.0, 2.0 ** -30, -(2.0 ** -30), 2.0 ** -40, -(2.0 ** -40), 2.0 ** -24, -(2.0 ** -24)]
    w = np.array([[1.0, 1.5, -1.25, 2.0 ** -3, 1.0 + 2.0 ** (1 - p)]] * len(deltas), dtype=dt)
    half = 2.0 ** -p  # half a unit in the last place of 1
    A = np.array([[1.0] * 5, [1.0] * 5])
    B = np.array([[half, d] for d in deltas])
    ref = add_lowrank_float64(w, A, B, 1.0)
    got = add_lowrank_f32(w, A, B, 1.0)
    assert got is not None
    assert_same(got, ref, "midpoints")
    # and a power of two approached from below: the spacing halves there
    w2 = np.array([[2.0 - 2.0 ** (1 - p)]], dtype=dt)
    for d in (2.0 ** -(p + 1) * 1.0, 2.0 ** -(p + 1) + 2.0 ** -40, 2.0 ** -(p + 1) - 2.0 ** -40):
        A2, B2 = np.array([[1.0]]), np.array([[d]])
        assert_same(add_lowrank_f32(w2, A2, B2, 1.0), add_lowrank_float64(w2, A2, B2, 1.0), f"below 2: {d}")


@pytest.mark.parametrize("dt", sorted(DTYPES))
def test_special_values_give_the_float64_bits(dt):
    dt = DTYPES[dt]
    big = float(ml_dtypes.finfo(BF16).max) if dt == BF16 else 65504.0
    w = np.array([[0.0, -0.0, np.inf, -np.inf, np.nan, big, -big, 1e-30 if dt == BF16 else 1e-7]], dtype=dt)
    for A, B in ((np.ones((1, 8)), np.zeros((1, 1))), (np.ones((1, 8)), np.full((1, 1), 2.0 ** -10)),
                 (-np.ones((1, 8)), np.full((1, 1), big))):
        with np.errstate(over="ignore"):  # big + update overflows to inf: the expected result, not an accident
            ref = add_lowrank_float64(w, A, B, 1.0)
            results = (add_lowrank_f32(w, A, B, 1.0), reflora.merge(w, A, B, scale=1.0).weight)
        for got in results:
            if got is not None:
                assert_same(got, ref, f"special values, B={B[0, 0]}")


def test_zero_weights_with_a_zero_update_stay_plus_zero_on_the_fast_path():
    """A fresh adapter (B = 0) on a weight with +0 entries: +0 + (+-0) is +0 whatever the order, so no fallback."""
    w = np.zeros((4, 5), BF16)
    got = add_lowrank_f32(w, np.ones((2, 5)), np.zeros((4, 2)), 2.0)
    assert got is not None and not np.any(np.signbit(got.astype(np.float32)))
    assert_same(got, add_lowrank_float64(w, np.ones((2, 5)), np.zeros((4, 2)), 2.0))


def test_rows_longer_than_a_sub_block():
    rng = np.random.default_rng(1)
    I = merge_f32.SUB_ELEMENTS + 123
    w = (rng.standard_normal((3, I)) * 0.02).astype(BF16)
    A = rng.uniform(-1, 1, (4, I)).astype(np.float32).astype(np.float64)
    B = rng.standard_normal((3, 4)).astype(np.float32).astype(np.float64) * 1e-2
    assert_same(add_lowrank_f32(w, A, B, 0.5), add_lowrank_float64(w, A, B, 0.5))


def test_fan_in_fan_out_in_the_shard_writer():
    """The writer merges a stored (I, O) weight with L = A^T, R = B^T: the same bits as merge(fan_in_fan_out=True)."""
    from types import SimpleNamespace

    from reflora.io.merge_writer import _fast_plan  # noqa: PLC2701 - the plan the writer would use

    rng = np.random.default_rng(2)
    O, I, R = 37, 53, 4
    w_IO = (rng.standard_normal((I, O)) * 0.02).astype(BF16)
    A = rng.uniform(-1, 1, (R, I)).astype(np.float32)
    B = (rng.standard_normal((O, R)) * 1e-2).astype(np.float32)
    job = SimpleNamespace(A=A, B=B, scale=1.5, magnitude=None, fan_in_fan_out=True)
    plan = _fast_plan(job, "weight", "BF16", (I, O))
    assert plan is not None
    out = np.empty_like(w_IO)
    merge_f32.merge_rows(plan, w_IO, 0, out, merge_f32.work_arrays(np, w_IO.size))
    assert_same(out, reflora.merge(w_IO, A, B, scale=1.5, fan_in_fan_out=True).weight)


def test_a_skipped_fallback_is_caught(monkeypatch):
    """Mutant: the candidates keep their provisional bits (no float64/Fraction pass). A tie must then come out wrong."""
    monkeypatch.setattr(merge_f32.Plan, "fix", lambda self, p0, w, out16, idx: 0)
    w = np.array([[1.0 + 2.0 ** -7]], dtype=BF16)  # an odd last bit
    A, B = np.array([[1.0]]), np.array([[2.0 ** -8]])  # exactly halfway to the next: ties to even go up
    got = add_lowrank_f32(w, A, B, 1.0)
    assert got is not None
    assert not np.array_equal(bits(got), bits(add_lowrank_float64(w, A, B, 1.0)))


def test_blas_threads_restores_the_setting():
    calls = merge_f32._openblas_calls()
    if not calls:
        pytest.skip("NumPy's BLAS here is not OpenBLAS (the context manager is a no-op)")
    get, _ = calls[0]
    before = int(get())
    with merge_f32.blas_threads(1):
        assert int(get()) == 1
    assert int(get()) == before


@pytest.mark.parametrize("dt", sorted(DTYPES))
def test_exact_cancellation_to_zero(dt):
    """W + s B A exactly 0 (and a hair off it) in normal-sized rows: +0 as the float64 path gives, no fallback."""
    dt = DTYPES[dt]
    rng = np.random.default_rng(5)
    O, I, R = 6, 300, 3
    w = (rng.standard_normal((O, I)) * 0.02).astype(dt)
    A = np.ones((R, I))
    B = np.zeros((O, R))
    B[:, 0] = -w[:, 0].astype(np.float64)  # column 0 cancels exactly in every row
    B[:, 1] = rng.standard_normal(O) * 2.0 ** -60  # and a hair in some rows: tiny non-zero results
    B[:3, 1] = 0.0
    A[1, 1:] = 0.0
    A[0, 1:] = 0.0
    got = add_lowrank_f32(w, A, B, 1.0)
    assert got is not None
    ref = add_lowrank_float64(w, A, B, 1.0)
    assert_same(got, ref, "cancellation")
    assert np.all(got[:3, 0].astype(np.float32) == 0)
