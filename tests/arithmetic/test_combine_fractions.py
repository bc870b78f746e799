"""PEFT's factor-wise combination rules, re-implemented independently in exact rationals (``fractions``).

An independent peer for ``reflora.combine``'s "linear", "ties", "magnitude_prune",
"dare_linear" and "dare_ties", written from PEFT's definitions (peft/utils/merge_utils.py
and LoraModel._generalized_task_arithmetic_weighted_adapter) in plain Python, element by
element, sharing no code with reflora:

    factor weights   A: sign(w s) sqrt|w s|,  B: sqrt|w s|      (one adapter: "linear")
    magnitude prune  keep the int(density n) largest |t| of each tensor (density >= 1: all);
                     equal magnitudes by position (reflora's documented order; torch.topk's
                     is unspecified, so PEFT may keep another of two equal entries)
    DARE             t * mask / density (density >= 1: t)
    ties election    sign of Σ_i t_i ("total") or of Σ_i sign(t_i) ("frequency"), >= 0 -> +,
                     over the pruned, unweighted tensors; entries of sign 0 never agree
    disjoint mean    Σ over agreeing i of c_i t_i, divided by max(1, their number)

The inputs are built so that float64 arithmetic is exact until the last division: entries
k/8 with |k| <= 8, scales s in {1, 4}, weights with |w s| a square of a dyadic rational
(so sqrt|w s| is exact), densities multiples of 1/4 (powers of 2 for DARE, which divides
by the density). Every product and sum is then exact
in float64, and the one inexact operation, the division by the count of agreeing
adapters (3), is correctly rounded: reflora must equal the exact rational rounded once,
bit for bit. Equal magnitudes and zeros are frequent on this grid, so the tie order and
the zero-sign rule are exercised.
"""

from __future__ import annotations

from fractions import Fraction as F

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import reflora

METHODS = ["linear", "ties", "magnitude_prune", "dare_linear", "dare_ties"]
# |w s| in {1/16, 1/4, 1, 9/4, 4, 9, 16, 36}: perfect squares of dyadic rationals
WEIGHTS = [F(1, 4), F(-1, 4), F(1), F(-1), F(9, 4), F(-9, 4)]


def _sqrt_exact(q: F) -> F:
    n, d = q.numerator, q.denominator
    rn, rd = int(round(n ** 0.5)), int(round(d ** 0.5))
    assert rn * rn == n and rd * rd == d, q
    return F(rn, rd)


def _sign(x: F) -> int:
    return (x > 0) - (x < 0)


def _prune_magnitude(t: list[F], density: F) -> list[F]:
    if density >= 1:
        return list(t)
    k = int(float(density) * len(t))  # PEFT: int(density * tensor.numel()), in floating point
    keep = set(sorted(range(len(t)), key=lambda j: (-abs(t[j]), j))[:k])
    return [x if j in keep else F(0) for j, x in enumerate(t)]


def _prune_dare(t: list[F], mask: list[int], density: F) -> list[F]:
    if density >= 1:
        return list(t)
    return [x * m / density for x, m in zip(t, mask)]


def _rule(method: str, tensors: list[list[F]], weights: list[F], density, majority, masks) -> list[F]:
    if method in ("ties", "magnitude_prune"):
        tensors = [_prune_magnitude(t, density) for t in tensors]
    elif method in ("dare_linear", "dare_ties"):
        tensors = [_prune_dare(t, m, density) for t, m in zip(tensors, masks)]
    n = len(tensors[0])
    if method not in ("ties", "dare_ties"):
        return [sum((c * t[j] for c, t in zip(weights, tensors)), F(0)) for j in range(n)]
    out = []
    for j in range(n):
        col = [t[j] for t in tensors]
        votes = sum(col, F(0)) if majority == "total" else sum(_sign(x) for x in col)
        elected = 1 if votes >= 0 else -1
        agree = [i for i, x in enumerate(col) if _sign(x) == elected]
        out.append(sum((weights[i] * col[i] for i in agree), F(0)) / max(1, len(agree)))
    return out


def reference(adapters, weights, method, density, majority, masks):
    """Exact (A, B) of the combination, as nested lists of Fractions."""
    if len(adapters) == 1:
        method = "linear"
    wA, wB = [], []
    for ad, w in zip(adapters, weights):
        ws = w * ad["s"]
        r = _sqrt_exact(abs(ws))
        wA.append(r if ws >= 0 else -r)
        wB.append(r)
    out = []
    for name, cw in (("A", wA), ("B", wB)):
        shape = adapters[0][name].shape
        flat = [[F(x) for x in ad[name].reshape(-1).tolist()] for ad in adapters]
        mk = None if masks is None else [[int(x) for x in m[name].reshape(-1).tolist()] for m in masks]
        out.append((shape, _rule(method, flat, cw, density, majority, mk)))
    return out


@st.composite
def cases(draw):
    n = draw(st.integers(1, 3))
    O, I, R = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 3))
    method = draw(st.sampled_from(METHODS))
    dare = method.startswith("dare")
    # DARE divides by the density: powers of 2 only, so the division is exact
    density = draw(st.sampled_from([F(1, 4), F(1, 2), F(1)] if dare else [F(0), F(1, 4), F(1, 2), F(3, 4), F(1)]))
    grid = st.integers(-8, 8)
    ads = []
    for _ in range(n):
        A = np.array(draw(st.lists(grid, min_size=R * I, max_size=R * I)), dtype=np.float64).reshape(R, I) / 8
        B = np.array(draw(st.lists(grid, min_size=O * R, max_size=O * R)), dtype=np.float64).reshape(O, R) / 8
        ads.append({"A": A, "B": B, "s": draw(st.sampled_from([F(1), F(4)]))})
    weights = [draw(st.sampled_from(WEIGHTS)) for _ in range(n)]
    majority = draw(st.sampled_from(["total", "frequency"]))
    return ads, weights, method, density, majority, draw(st.integers(0, 2**16))


@settings(max_examples=150, deadline=None)
@given(case=cases())
def test_factorwise_rules_equal_the_exact_rationals_rounded_once(case):
    ads, weights, method, density, majority, seed = case
    layers = [reflora.LoraAdapter.from_arrays(a["A"], a["B"], alpha=float(a["s"] * a["A"].shape[0]))
              for a in ads]
    for layer, a in zip(layers, ads):
        assert layer.scale == float(a["s"])
    kw = {}
    if method != "linear":
        kw["density"] = float(density)
    if method in ("ties", "dare_ties"):
        kw["majority_sign_method"] = majority
    masks = None
    if method.startswith("dare"):
        masks = reflora.dare_masks(layers, method=method, density=float(density), seed=seed)
        kw["masks"] = masks
    got = reflora.combine(layers, [float(w) for w in weights], method=method, **kw)
    want = reference(ads, weights, method, density, majority, masks)
    for arr, (shape, exact) in zip((got.A, got.B), want):
        assert arr.shape == shape
        np.testing.assert_array_equal(arr.reshape(-1), np.array([float(x) for x in exact]),
                                      err_msg=f"{method} density={density} {majority}")
    assert got.scale == 1.0


def test_the_reference_sees_what_it_should():
    """The rules above are not vacuous: on a fixed case, ties, magnitude_prune and linear give three results,
    and "frequency" differs from "total" where one large entry outvotes two small ones."""
    t = [[F(3), F(-1, 8)], [F(-1, 8), F(1, 8)], [F(-1, 8), F(1, 4)]]
    w = [F(1)] * 3
    total = _rule("ties", t, w, F(1), "total", None)
    freq = _rule("ties", t, w, F(1), "frequency", None)
    assert total[0] == F(3) and freq[0] == F(-1, 8)   # Σ = 2.75 > 0 elects +; two of three are - by count
    assert _rule("linear", t, w, F(1), "total", None)[0] == F(11, 4)
    # one entry kept per tensor: 3; -1/8 (equal magnitudes: the first); 1/4
    assert _rule("magnitude_prune", t, w, F(1, 2), "total", None) == [F(23, 8), F(1, 4)]
    # entries of sign 0 never agree: a column pruned to zeros stays 0 (0 / max(1, 0))
    assert _rule("ties", [[F(0)], [F(0)]], [F(1), F(1)], F(1), "total", None) == [F(0)]


@pytest.mark.parametrize("majority", ["total", "frequency"])
def test_equal_magnitudes_are_kept_by_position(majority):
    """Four equal |entries|, density 1/2: the first two (by position) survive, in reflora and the reference."""
    A = np.array([[0.5, -0.5, 0.5, -0.5]])
    B = np.ones((1, 1))
    ads = [{"A": A, "B": B, "s": F(1)}, {"A": -A, "B": B, "s": F(1)}]
    layers = [reflora.LoraAdapter.from_arrays(a["A"], a["B"], alpha=1.0) for a in ads]
    got = reflora.combine(layers, [1.0, 1.0], method="ties", density=0.5, majority_sign_method=majority)
    (_, exact), _ = reference(ads, [F(1), F(1)], "ties", F(1, 2), majority, None)
    np.testing.assert_array_equal(got.A.reshape(-1), [float(x) for x in exact])
    # both adapters keep positions 0 and 1, with opposite signs: each column's vote is 0, which elects +,
    # so the positive entry alone survives there; positions 2 and 3 are pruned in both
    assert [float(x) for x in exact] == [0.5, 0.5, 0.0, 0.0]
