"""reflora.combine: identities, Eckart-Young, DoRA, every backend, and the errors.

Oracles that do not go through the code under test: ΔW = s B A formed here in float64
(the sum the combination must equal), NumPy's SVD of the dense sum (Eckart-Young),
and the DoRA layer's own output (reflora.dora_forward / the formula). PEFT as a peer
is in test_combine_peft.py.
"""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reflora
from reflora.backend import to_numpy

U64 = np.finfo(np.float64).eps / 2


def layer(c):
    """The combined adapter as a reflora layer (combine returns plain data)."""
    return reflora.LoraAdapter.from_arrays(**c._asdict())


def _ad(rng, O, I, R, *, alpha=None, rslora=False, xp=None, **extra):
    A, B = rng.standard_normal((R, I)), rng.standard_normal((O, R))
    alpha = float(rng.uniform(0.5, 16)) if alpha is None else alpha
    if xp is not None:
        A, B = xp.asarray(A), xp.asarray(B)
        extra = {k: (None if v is None else xp.asarray(v)) for k, v in extra.items()}
    return reflora.LoraAdapter.from_arrays(A, B, alpha=alpha, use_rslora=rslora, **extra)


def dw(ad) -> np.ndarray:
    """s B A in float64 on the host (the oracle; formed here only)."""
    A, B = (np.asarray(to_numpy(t), dtype=np.float64) for t in (ad.A, ad.B))
    return ad.scale * B @ A


def bound(ads, weights) -> np.ndarray:
    """Elementwise rounding bound for Σ w_i s_i B_i A_i against its float64 evaluation in any order:
    every term is a length-R_i dot product with two scalings, the sum adds n terms:
    |error| <= γ_(R+n+2) Σ_i |w_i s_i| |B_i| |A_i|, γ_k = k u / (1 - k u)."""
    k = max(ad.config.rank for ad in ads) + len(ads) + 2
    gamma = k * U64 / (1 - k * U64)
    acc = sum(abs(w * ad.scale) * np.abs(np.asarray(to_numpy(ad.B))) @ np.abs(np.asarray(to_numpy(ad.A)))
              for ad, w in zip(ads, weights))
    return 2 * gamma * acc  # both sides carry such an error


def assert_sum(got, ads, weights):
    want = sum(w * dw(ad) for ad, w in zip(ads, weights))
    err = np.abs(dw(got) - want)
    b = bound(ads, weights)
    assert np.all(err <= b + 1e-300), f"max err {err.max():.3e}, max excess {(err - b).max():.3e}"


# ---------------------------------------------------------------- identities (hypothesis)

shapes = st.tuples(st.integers(1, 9), st.integers(1, 9))  # (O, I)
weights_st = st.floats(-3, 3, allow_nan=False, allow_infinity=False)


@settings(max_examples=30)
@given(oi=shapes, ranks=st.lists(st.integers(1, 5), min_size=1, max_size=4), seed=st.integers(0, 2**16),
       rsl=st.booleans(), data=st.data())
def test_exact_is_the_weighted_sum_of_updates(oi, ranks, seed, rsl, data):
    rng = np.random.default_rng(seed)
    ads = [_ad(rng, *oi, R, rslora=rsl) for R in ranks]
    ws = data.draw(st.lists(weights_st, min_size=len(ads), max_size=len(ads)))
    got = reflora.combine(ads, ws)
    assert got.scale == 1.0 and got.rank == sum(ranks) and not got.use_rslora
    assert_sum(got, ads, ws)
    # cat is the same representation
    cat = reflora.combine(ads, ws, method="cat")
    if len(ads) > 1:
        np.testing.assert_array_equal(cat.A, got.A)


@settings(max_examples=25)
@given(oi=shapes, R=st.integers(1, 5), seed=st.integers(0, 2**16), rsl=st.booleans(),
       method=st.sampled_from(["exact", "cat", "linear", "svd", "ties", "dare_linear", "magnitude_prune"]))
def test_one_adapter_with_weight_one_is_itself(oi, R, seed, rsl, method):
    rng = np.random.default_rng(seed)
    ad = _ad(rng, *oi, R, rslora=rsl)
    kw = {"density": 0.5} if method in ("ties", "magnitude_prune") else {}
    if method == "dare_linear":
        kw = {"density": 0.5, "seed": 0}
    got = reflora.combine([ad], [1.0], method=method, **kw)
    assert_sum(got, [ad], [1.0])


@settings(max_examples=25)
@given(oi=shapes, ranks=st.lists(st.integers(1, 4), min_size=1, max_size=3), seed=st.integers(0, 2**16),
       c=weights_st, data=st.data())
def test_weights_scale_the_update_linearly(oi, ranks, seed, c, data):
    rng = np.random.default_rng(seed)
    ads = [_ad(rng, *oi, R) for R in ranks]
    ws = data.draw(st.lists(weights_st, min_size=len(ads), max_size=len(ads)))
    one = reflora.combine(ads, ws)
    scaled = reflora.combine(ads, [c * w for w in ws])
    # ΔW(c w) = c ΔW(w): compare both with the oracle sum (bound for c w) rather than with each other
    assert_sum(scaled, ads, [c * w for w in ws])
    np.testing.assert_allclose(dw(scaled), c * dw(one), rtol=0,
                               atol=float((bound(ads, [c * w for w in ws]) + abs(c) * bound(ads, ws)).max()) + 1e-300)


@settings(max_examples=20)
@given(oi=shapes, r1=st.integers(1, 4), r2=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_cat_of_two_is_their_sum(oi, r1, r2, seed):
    rng = np.random.default_rng(seed)
    a, b = _ad(rng, *oi, r1, rslora=True), _ad(rng, *oi, r2)
    got = reflora.combine([a, b], [1.0, 1.0], method="cat")
    assert_sum(got, [a, b], [1.0, 1.0])


@settings(max_examples=20)
@given(oi=shapes, R=st.integers(1, 6), seed=st.integers(0, 2**16), w=weights_st)
def test_rslora_adapters_combine_by_their_update(oi, R, seed, w):
    """An rsLoRA adapter and a plain one with the same A, B and the same scale give the same result."""
    rng = np.random.default_rng(seed)
    rs = _ad(rng, *oi, R, alpha=4.0, rslora=True)
    plain = reflora.LoraAdapter.from_arrays(rs.A, rs.B, alpha=4.0 * R / math.sqrt(R), use_rslora=False)
    for method in ("exact", "linear", "svd"):
        x, y = (reflora.combine([ad, ad], [w, 0.5], method=method) for ad in (rs, plain))
        np.testing.assert_allclose(dw(x), dw(y), rtol=0, atol=float(2 * bound([rs, rs], [w, 0.5]).max()) + 1e-300)
        want = (w + 0.5) * dw(rs)
        if method == "exact":
            assert_sum(x, [rs, rs], [w, 0.5])
        elif method == "svd":
            # the sum has rank R = svd_rank: the truncation is exact up to the SVD's backward error
            norm2 = np.linalg.norm(want, 2)
            assert np.linalg.norm(dw(x) - want) <= 64 * max(oi) * U64 * norm2 * math.sqrt(R) + 1e-300


# ---------------------------------------------------------------- Eckart-Young


@settings(max_examples=25)
@given(O=st.integers(2, 12), I=st.integers(2, 12), ranks=st.lists(st.integers(1, 4), min_size=2, max_size=3),
       seed=st.integers(0, 2**16), k=st.integers(1, 6))
def test_exact_rank_k_is_the_best_rank_k_of_the_dense_sum(O, I, ranks, seed, k):
    rng = np.random.default_rng(seed)
    ads = [_ad(rng, O, I, R) for R in ranks]
    ws = list(rng.uniform(-2, 2, len(ads)))
    got = reflora.combine(ads, ws, rank=k)
    assert got.rank == k and got.scale == 1.0
    M = sum(w * dw(ad) for ad, w in zip(ads, ws))
    U, s, Vt = np.linalg.svd(M, full_matrices=False)
    kk = min(k, len(s))  # M has at most min(O, I) singular values
    Mk = (U[:, :kk] * s[:kk]) @ Vt[:kk]
    # Eckart-Young: the error is sqrt(Σ_{j>k} σ_j^2), to the backward error of an SVD,
    # ||E||_F <= 16 O I u ||M||_F (the constant of reflora.testing.combine_checks), on either side
    err = np.linalg.norm(M - dw(got))
    floor = 16 * O * I * U64 * np.linalg.norm(M)
    assert abs(err - math.sqrt(np.sum(s[k:] ** 2))) <= floor * math.sqrt(k) + floor
    # the same matrix where the k-th singular value is separated from the next (Wedin)
    gap = s[kk - 1] - (s[kk] if kk < len(s) else 0.0)
    if gap > 1e-6 * s[0]:
        assert np.linalg.norm(dw(got) - Mk) <= 2 * (floor + 2 * s[0] * floor / gap) * math.sqrt(k)


def test_exact_rank_k_never_forms_o_by_i():
    """O = I = 200,000: the dense update would take 320 GB; the thin path needs O((I + O) ΣR)."""
    rng = np.random.default_rng(0)
    O = I = 200_000
    ads = [reflora.LoraAdapter.from_arrays(rng.standard_normal((2, I)), rng.standard_normal((O, 2)), alpha=2.0)
           for _ in range(3)]
    tracemalloc.start()
    got = reflora.combine(ads, [1.0, -0.5, 0.25], rank=3)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert got.A.shape == (3, I) and got.B.shape == (O, 3)
    assert peak < 200 * (I + O) * 8, f"peak {peak / 2**20:.0f} MiB"
    # spot-check entries of the update against the factors, without forming it
    rows, cols = rng.integers(0, O, 5), rng.integers(0, I, 5)
    full = sum(w * ad.scale * np.einsum("kr,rk->k", ad.B[rows], ad.A[:, cols])
               for ad, w in zip(ads, [1.0, -0.5, 0.25]))
    # rank 3 of a rank-6 sum is not exact; but with rank 6 it is
    exact6 = reflora.combine(ads, [1.0, -0.5, 0.25], rank=6)
    np.testing.assert_allclose(np.einsum("kr,rk->k", exact6.B[rows], exact6.A[:, cols]), full, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------- DoRA, lora_bias


def _dora(rng, W, R, *, alpha=3.0):
    O, I = W.shape
    A, B = rng.standard_normal((R, I)), 0.4 * rng.standard_normal((O, R))
    s = alpha / R
    m = np.linalg.norm(W + s * B @ A, axis=1) * rng.uniform(0.7, 1.3, O)
    return reflora.LoraAdapter.from_arrays(A, B, alpha=alpha, W=W, magnitude=m)


def _effective(ad) -> np.ndarray:
    """The layer's update as a dense matrix: DoRA's diag(m/n)(W + sBA) - W, or s B A."""
    if ad.magnitude is None:
        return dw(ad)
    V = ad.W + ad.scale * ad.B @ ad.A
    return (ad.magnitude / np.linalg.norm(V, axis=1))[:, None] * V - ad.W


@pytest.mark.parametrize("mixed", [False, True])
def test_exact_dora_combination_is_the_weighted_sum_of_effective_updates(rng, mixed):
    W = rng.standard_normal((6, 8))
    ads = [_dora(rng, W, 3), _dora(rng, W, 2)]
    if mixed:
        ads.append(reflora.LoraAdapter.from_arrays(rng.standard_normal((2, 8)), rng.standard_normal((6, 2)),
                                                   alpha=2.0, W=W))
    ws = [0.7, -0.4, 1.2][:len(ads)]
    got = reflora.combine(ads, ws)
    cat = reflora.combine(ads, ws, method="cat")  # cat of DoRA adapters is the same exact combination
    np.testing.assert_array_equal(cat.magnitude, got.magnitude)
    assert got.magnitude is not None and got.rank == sum(ad.config.rank for ad in ads)
    x = rng.standard_normal((4, 8))
    want = x @ (W + sum(w * _effective(ad) for ad, w in zip(ads, ws))).T
    np.testing.assert_allclose(layer(got).forward(x), want, rtol=0, atol=1e-12 * np.abs(want).max())
    # each adapter's own forward is what _effective says (the oracle is the layer itself)
    for ad in ads:
        np.testing.assert_allclose(ad.forward(x), x @ (W + _effective(ad)).T, rtol=0, atol=1e-12 * np.abs(want).max())


def test_dora_refusals(rng):
    W = rng.standard_normal((4, 5))
    a = _dora(rng, W, 2)
    with pytest.raises(ValueError, match="DoRA.*'exact'"):
        reflora.combine([a, a], [1.0, 1.0], method="linear")
    one = reflora.combine([a], [1.0], method="cat")  # one adapter: still the exact DoRA path, not "linear"
    np.testing.assert_allclose(layer(one).forward(np.ones((1, 5))), a.forward(np.ones((1, 5))), rtol=1e-13)
    with pytest.raises(ValueError, match="rank= with DoRA"):
        reflora.combine([a, a], [1.0, 1.0], rank=1)
    noW = reflora.LoraAdapter.from_arrays(a.A, a.B, alpha=3.0, magnitude=a.magnitude)
    with pytest.raises(ValueError, match="no base weight W"):
        reflora.combine([noW], [1.0])
    other = _dora(rng, W + 1.0, 2)
    with pytest.raises(ValueError, match="different base weights"):
        reflora.combine([a, other], [1.0, 1.0])
    # d = 1 + Σ w_i (c_i - 1) = 0 in some row: not representable
    c = a.magnitude / np.linalg.norm(W + a.scale * a.B @ a.A, axis=1)
    twice = reflora.LoraAdapter.from_arrays(a.A, a.B, alpha=3.0, W=W, magnitude=2 * a.magnitude / c)  # c = 2
    with pytest.raises(ValueError, match="d = 1"):
        reflora.combine([twice], [-1.0])


@pytest.mark.parametrize("method,kw", [("exact", {}), ("exact", {"rank": 2}), ("cat", {}), ("linear", {}),
                                       ("svd", {"svd_rank": 6})])
def test_lora_bias_combines_like_the_update(rng, method, kw):
    W, bias = rng.standard_normal((5, 6)), rng.standard_normal(5)
    ads = [_ad(rng, 5, 6, 3, W=W, bias=bias, lora_bias=rng.standard_normal(5)) for _ in range(2)]
    ws = [0.3, -1.7]
    got = reflora.combine(ads, ws, method=method, **kw)
    want = sum(w * ad.scale * ad.lora_bias for ad, w in zip(ads, ws))
    np.testing.assert_allclose(got.scale * got.lora_bias, want, rtol=0, atol=8 * U64 * np.abs(want).max())
    with pytest.raises(ValueError, match="lora_bias"):
        reflora.combine(ads, ws, method="ties", density=0.5)


# ---------------------------------------------------------------- DARE


def test_dare_masks_structure_and_seed(rng):
    ads = [_ad(rng, 4, 5, 2) for _ in range(2)]
    m = reflora.dare_masks(ads, method="dare_linear", density=0.5, seed=3)
    assert [sorted(e) for e in m] == [["A", "B"], ["A", "B"]]
    assert m[0]["A"].shape == (2, 5) and m[0]["B"].shape == (4, 2)
    assert set(np.unique(np.concatenate([e[k].ravel() for e in m for k in e]))) <= {0.0, 1.0}
    again = reflora.dare_masks(ads, method="dare_linear", density=0.5, seed=3)
    np.testing.assert_array_equal(m[1]["B"], again[1]["B"])
    svd = reflora.dare_masks(ads, method="dare_ties_svd", density=0.5, seed=3)
    assert svd[0]["delta"].shape == (4, 5)
    # per-module dicts: {module: [..]} with None for an adapter without the module
    mods = reflora.dare_masks([{"p": ads[0], "q": ads[1]}, {"q": ads[0]}], method="dare_linear", density=0.5,
                              seed=1)
    assert list(mods) == ["p", "q"] and mods["p"][1] is None and mods["q"][1]["A"].shape == (2, 5)


def test_dare_prunes_with_the_given_masks(rng):
    """DARE by hand: A' = Σ c_i (A_i ⊙ mask_i) / density, with the sign-on-A weights of PEFT."""
    ads = [_ad(rng, 4, 5, 2) for _ in range(2)]
    ws = [0.8, -0.6]
    m = reflora.dare_masks(ads, method="dare_linear", density=0.4, seed=5)
    got = reflora.combine(ads, ws, method="dare_linear", density=0.4, masks=m)
    cA = [math.copysign(math.sqrt(abs(w * ad.scale)), w * ad.scale) for ad, w in zip(ads, ws)]
    cB = [math.sqrt(abs(w * ad.scale)) for ad, w in zip(ads, ws)]
    wantA = sum(c * ad.A * mk["A"] / 0.4 for c, ad, mk in zip(cA, ads, m))
    wantB = sum(c * ad.B * mk["B"] / 0.4 for c, ad, mk in zip(cB, ads, m))
    np.testing.assert_allclose(got.A, wantA, rtol=4 * U64 * 4, atol=0)
    np.testing.assert_allclose(got.B, wantB, rtol=4 * U64 * 4, atol=0)
    # density 1 prunes nothing: dare_linear = linear
    full = reflora.combine(ads, ws, method="dare_linear", density=1.0, seed=0)
    np.testing.assert_array_equal(full.A, reflora.combine(ads, ws, method="linear").A)


def test_ties_by_hand():
    """Two 1 x 4 'A' factors with weight 1 and scale 1: prune to 2 entries, elect, disjoint mean."""
    A1 = np.array([[3.0, -1.0, 0.5, -2.0]])
    A2 = np.array([[-1.0, 4.0, 0.2, -3.0]])
    B = np.ones((1, 1))
    ads = [reflora.LoraAdapter.from_arrays(A, B, alpha=1.0) for A in (A1, A2)]
    got = reflora.combine(ads, [1.0, 1.0], method="ties", density=0.5)
    # pruned: [3, 0, 0, -2] and [0, 4, 0, -3]; "total" signs: +, +, + (0 counts as +), -
    # column 0: only 3 agrees -> 3; column 1: 4; column 2: none -> 0 / 1; column 3: (-2 - 3) / 2
    np.testing.assert_array_equal(got.A, [[3.0, 4.0, 0.0, -2.5]])
    freq = reflora.combine(ads, [1.0, 1.0], method="ties", density=0.5, majority_sign_method="frequency")
    np.testing.assert_array_equal(freq.A, [[3.0, 4.0, 0.0, -2.5]])
    mag = reflora.combine(ads, [1.0, -1.0], method="magnitude_prune", density=0.5)
    np.testing.assert_array_equal(mag.A, [[3.0, -4.0, 0.0, 1.0]])


# ---------------------------------------------------------------- per-module dicts


def test_per_module_dicts_and_missing_modules(rng):
    a = {"q": _ad(rng, 4, 5, 2), "v": _ad(rng, 3, 5, 4)}
    b = {"q": _ad(rng, 4, 5, 3)}
    got = reflora.combine([a, b], [1.0, 2.0])
    assert list(got) == ["q", "v"]
    assert_sum(got["q"], [a["q"], b["q"]], [1.0, 2.0])
    assert_sum(got["v"], [a["v"]], [1.0])
    assert got["q"].rank == 5 and got["v"].rank == 4


# ---------------------------------------------------------------- backends


@pytest.mark.parametrize("method,kw", [("exact", {}), ("exact", {"rank": 2}), ("linear", {}),
                                       ("ties", {"density": 0.5}), ("dare_ties", {"density": 0.5, "seed": 2}),
                                       ("svd", {"svd_rank": 2, "svd_clamp": 0.95}),
                                       ("magnitude_prune_svd", {"density": 0.5})])
def test_every_backend_gives_numpys_result(xp, method, kw):
    """The NumPy-backed namespaces run the same NumPy/LAPACK calls: identical factors. CuPy (other BLAS,
    cuSOLVER) within a rounding bound: elementwise γ_(R+n+2) Σ|w s||B||A| for forming the sum, plus, where an
    SVD is taken, a backward error 16 O I u ||M||_F moved by at most 2 σ_1 / gap (Wedin), twice (both sides)."""
    ref_ads = [_ad(np.random.default_rng(s), 5, 6, 3, alpha=2.0) for s in (1, 2)]
    ads = [_ad(np.random.default_rng(s), 5, 6, 3, alpha=2.0, xp=xp) for s in (1, 2)]
    ws = [0.9, -0.4]
    ref = reflora.combine(ref_ads, ws, method=method, **kw)
    got = reflora.combine(ads, ws, method=method, **kw)
    assert type(got.A) is type(ads[0].A)
    if "cupy" not in xp.__name__:
        np.testing.assert_array_equal(np.asarray(to_numpy(got.A)), ref.A)
        np.testing.assert_array_equal(np.asarray(to_numpy(got.B)), ref.B)
        return
    if "svd_clamp" in kw:
        pytest.skip("the clamp threshold is a quantile of the factors' entries, which depend on the signs the SVD "
                    "gives its singular vectors: cuSOLVER and LAPACK may choose differently")
    # the matrix before truncation: the method's own dense result at full rank (the plain sum otherwise)
    if method.endswith("svd"):
        M = dw(reflora.combine(ref_ads, ws, method=method, **dict(kw, svd_rank=min(5, 6))))
    else:
        M = dw(reflora.combine(ref_ads, ws)) if method == "exact" else dw(ref)
    s = np.linalg.svd(M, compute_uv=False)
    k = min(ref.rank, len(s))
    gap = s[k - 1] - (s[k] if k < len(s) else 0.0)
    E = 16 * M.shape[0] * M.shape[1] * U64 * float(np.linalg.norm(M))
    tol = 2 * (E + 2 * s[0] * E / gap) * math.sqrt(k) + float(np.linalg.norm(bound(ref_ads, ws)))
    assert np.linalg.norm(dw(got) - dw(ref)) <= tol


def test_dora_on_every_backend(xp):
    rng = np.random.default_rng(3)
    W = rng.standard_normal((4, 6))
    ref = [_dora(np.random.default_rng(s), W, 2) for s in (1, 2)]
    ads = [reflora.LoraAdapter.from_arrays(xp.asarray(a.A), xp.asarray(a.B), alpha=3.0, W=xp.asarray(W),
                                           magnitude=xp.asarray(a.magnitude)) for a in ref]
    got, want = reflora.combine(ads, [0.5, 0.5]), reflora.combine(ref, [0.5, 0.5])
    np.testing.assert_allclose(np.asarray(to_numpy(got.magnitude)), want.magnitude, rtol=1e-13)


# ---------------------------------------------------------------- errors


def test_errors(rng):
    a, b = _ad(rng, 4, 5, 2), _ad(rng, 4, 5, 3)
    cases = [
        (dict(adapters=a, weights=[1.0]), TypeError, "list of reflora.LoraAdapter"),
        (dict(adapters=[a, {"q": a}], weights=[1.0, 1.0]), TypeError, "do not mix"),
        (dict(adapters=[a], weights=[1.0, 2.0]), ValueError, "expected 1, one per adapter"),
        (dict(adapters=[a], weights=[float("nan")]), ValueError, "finite real"),
        (dict(adapters=[a], weights=[1.0], method="avg"), ValueError, "expected one of"),
        (dict(adapters=[a], weights=[1.0], method="linear", rank=2), ValueError, "svd_rank"),
        (dict(adapters=[a], weights=[1.0], rank=0), ValueError, "int >= 1"),
        (dict(adapters=[a, a], weights=[1.0, 1.0], method="ties"), ValueError, "density"),
        (dict(adapters=[a, a], weights=[1.0, 1.0], method="ties", density=1.5), ValueError, r"\[0, 1\]"),
        (dict(adapters=[a, a], weights=[1.0, 1.0], method="dare_linear", density=0.0, seed=1), ValueError,
         r"\(0, 1\]"),
        (dict(adapters=[a, a], weights=[1.0, 1.0], method="dare_linear", density=0.5), ValueError, "seed="),
        (dict(adapters=[a, a], weights=[1.0, 1.0], method="linear", seed=1), ValueError, "DARE"),
        (dict(adapters=[a, b], weights=[1.0, 1.0], method="linear"), ValueError, r"ranks \[2, 3\]"),
        (dict(adapters=[a, a], weights=[1.0, 1.0], method="svd", svd_clamp=2.0), ValueError, "quantile"),
        (dict(adapters=[a, a], weights=[1.0, 1.0], method="svd", svd_driver="x"), ValueError, "svd_driver"),
        (dict(adapters=[a, a], weights=[1.0, 1.0], method="ties", density=0.5, majority_sign_method="x"),
         ValueError, "majority_sign_method"),
        (dict(adapters=[a, a], weights=[1.0, 1.0], method="exact", density=0.5), ValueError, "prunes nothing"),
        (dict(adapters=[a, _ad(rng, 4, 6, 2)], weights=[1.0, 1.0]), ValueError, r"\(R, I\) = \(R, 5\)"),
    ]
    for kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            reflora.combine(**kw)
    f32 = reflora.LoraAdapter.from_arrays(a.A.astype(np.float32), a.B.astype(np.float32), alpha=1.0)
    with pytest.raises(TypeError, match="dtype float32; expected float64"):
        reflora.combine([a, f32], [1.0, 1.0])
    m = reflora.dare_masks([a, a], method="dare_linear", density=0.5, seed=0)
    bad = [dict(m[0]), dict(m[1])]
    bad[1]["A"] = bad[1]["A"] * 0.5
    with pytest.raises(ValueError, match="other than 0 and 1"):
        reflora.combine([a, a], [1.0, 1.0], method="dare_linear", density=0.5, masks=bad)
    bad[1]["A"] = np.ones((3, 5))
    with pytest.raises(ValueError, match=r"expected \(2, 5\)"):
        reflora.combine([a, a], [1.0, 1.0], method="dare_linear", density=0.5, masks=bad)
    bad[1]["A"] = np.ones((2, 5), dtype=bool)
    with pytest.raises(TypeError, match="dtype bool; expected float64"):
        reflora.combine([a, a], [1.0, 1.0], method="dare_linear", density=0.5, masks=bad)
    # weights as a NumPy vector are fine
    assert_sum(reflora.combine([a, b], np.array([0.5, 2.0])), [a, b], [0.5, 2.0])


def test_wrong_types_are_type_errors_and_seeds_are_checked(rng):
    """STYLE: TypeError for a wrong type, ValueError for a wrong value; a negative seed in the house wording."""
    a = _ad(rng, 4, 5, 2)
    cases = [
        (dict(weights=["1"]), TypeError, r"weights\[0\] is '1' \(str\)"),
        (dict(weights=[None]), TypeError, r"weights\[0\] is None"),
        (dict(weights=[float("inf")]), ValueError, r"weights\[0\] is inf; expected a finite"),
        (dict(weights=[1.0], rank=2.0), TypeError, "rank is 2.0"),
        (dict(weights=[1.0], method="ties", density="0.5"), TypeError, "density is '0.5'"),
        (dict(weights=[1.0], method="svd", svd_rank=1.5), TypeError, "svd_rank is 1.5"),
        (dict(weights=[1.0], method="svd", svd_clamp="0.9"), TypeError, "svd_clamp is '0.9'"),
        (dict(weights=[1.0], method="svd", svd_full_matrices=1), TypeError, "svd_full_matrices is 1"),
        (dict(weights=[1.0], method="dare_linear", density=0.5, seed=1.5), TypeError, "seed is 1.5"),
        (dict(weights=[1.0], method="dare_linear", density=0.5, seed=-1), ValueError,
         "seed is -1; expected an int >= 0"),
    ]
    for kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            reflora.combine([a], **kw)


def test_duck_typed_adapters_are_checked_like_lora_adapters(rng):
    """combine takes any object with A, B and scale; what LoraAdapter guarantees is checked at the boundary.
    Before: A (2, 5) with B (4, 3) gave a Combined with A (4, 5) and B (4, 6), and a lora_bias of shape (1,)
    was broadcast over the O outputs, both silently."""
    from types import SimpleNamespace as NS

    A, B = rng.standard_normal((2, 5)), rng.standard_normal((4, 2))
    cases = [
        (NS(A=A, B=rng.standard_normal((4, 3)), scale=1.0), ValueError, r"has A \(2, 5\), B \(4, 3\); expected"),
        (NS(A=A, B=B, scale=1.0, lora_bias=np.ones(1)), ValueError, r"lora_bias has shape \(1,\); expected \(4,\)"),
        (NS(A=A, B=B, scale=1.0, magnitude=np.ones(5)), ValueError, r"magnitude has shape \(5,\); expected \(4,\)"),
        (NS(A=A, B=B, scale=1.0, W=np.ones((5, 4))), ValueError, r"W has shape \(5, 4\); expected \(4, 5\)"),
        (NS(A=A, B=B.astype(np.float32), scale=1.0), TypeError, "B has dtype float32; expected float64"),
        (NS(A=A, B=B, scale="2"), TypeError, r"scale is '2'; expected a finite real"),
        (NS(A=A, B=B, scale=float("nan")), ValueError, r"scale is nan; expected a finite real"),
    ]
    for ad, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            reflora.combine([ad, ad], [1.0, 1.0])
    # a consistent one works; entries k/8 keep every product and sum exact, so the update is exactly B A
    A8, B8 = rng.integers(-8, 9, (2, 5)) / 8.0, rng.integers(-8, 9, (4, 2)) / 8.0
    ok = NS(A=A8, B=B8, scale=2.0, lora_bias=np.ones(4))
    got = reflora.combine([ok, ok], [1.0, -0.5])
    np.testing.assert_array_equal(got.B @ got.A, B8 @ A8)  # (1 - 0.5) * 2 = 1
    np.testing.assert_array_equal(got.lora_bias, np.full(4, 1.0))  # (1 - 0.5) * 2 * 1
