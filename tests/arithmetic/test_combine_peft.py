"""reflora.combine against PEFT 0.21.2's add_weighted_adapter, float64, every method.

Where PEFT is right the two agree: the factor-wise methods (cat, linear, ties, dare_*,
magnitude_prune) factor for factor and bit for bit (the same operations in the same
order on the same float64 inputs, with torch's default dtype float64 so that PEFT's
weight tensor is not rounded to float32); the svd methods in ΔW = B A (the singular
vectors' signs are LAPACK's choice), within the bound derived in ``svd_tolerance``.
DARE gets the same masks on both sides: PEFT's torch.bernoulli is replaced, for the
duration of the call, by one that returns reflora's masks in PEFT's drawing order.

Where PEFT is wrong (#3004, #3449/#3473, #3761, #3608, #3737) a test documents the
difference and checks that reflora gives the combination of the adapters' updates.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

import reflora
from peft_combine import MODULES, bernoulli_from, build, float64_default, peft_output, run_peft

pytestmark = [pytest.mark.interop]

U64 = np.finfo(np.float64).eps / 2


def layer(c):
    """The combined adapter as a reflora layer (combine returns plain data)."""
    return reflora.LoraAdapter.from_arrays(**c._asdict())


@pytest.fixture(autouse=True)
def _f64():
    with float64_default():
        yield


def delta(ad) -> np.ndarray:
    """ΔW = s B A of a plain adapter (formed here only to check)."""
    return ad.scale * ad.B @ ad.A


def svd_tolerance(M: np.ndarray, k: int) -> float:
    """Frobenius bound on two float64 rank-k truncated SVDs of (nearly) the same M.

    A backward-stable SVD is exact for M + E with ||E||_F <= 16 O I u ||M||_F (Householder
    bidiagonalisation, Higham ch. 19; the constant as in reflora.testing.combine_checks, where
    LAPACK's measured worst is 10.3); by Wedin's theorem the rank-k singular subspaces move by
    sin(theta) <= ||E|| / gap, gap = sigma_k - sigma_(k+1), and the truncation by at most
    ||E|| + 2 sigma_1 sin(theta). Both sides carry such an E (forming M in different matmul
    orders adds O(R u ||M||), far less), so twice that.
    """
    s = np.linalg.svd(M, compute_uv=False)
    gap = s[k - 1] - (s[k] if k < len(s) else 0.0)
    E = 16 * M.shape[0] * M.shape[1] * U64 * float(np.linalg.norm(M))
    return 2 * (E + 2 * s[0] * E / gap) * math.sqrt(k)


PLAIN = [dict(r=3, lora_alpha=5), dict(r=3, lora_alpha=2), dict(r=3, lora_alpha=7)]
WEIGHTS = [0.7, -1.3, 0.4]


def _ours(ours, weights, method, **kw):
    return reflora.combine(ours, weights, method=method, **kw)


# ---------------------------------------------------------------- equal where PEFT is right


@pytest.mark.parametrize("method,kw", [
    ("cat", {}),
    ("linear", {}),
    ("ties", {"density": 0.5}),
    ("ties", {"density": 0.3, "majority_sign_method": "frequency"}),
    ("magnitude_prune", {"density": 0.6}),
])
def test_factorwise_methods_equal_peft_bit_for_bit(method, kw):
    model, ours = build(PLAIN, seed=1)
    got = _ours(ours, WEIGHTS, method, **kw)
    ref = run_peft(model, WEIGHTS, method, **kw)
    for mod in MODULES:
        assert ref[mod]["scaling"] == 1.0 == got[mod].scale
        np.testing.assert_array_equal(got[mod].A, ref[mod]["A"], err_msg=f"{method} {mod} A")
        np.testing.assert_array_equal(got[mod].B, ref[mod]["B"], err_msg=f"{method} {mod} B")


def _peft_mask_order(masks: dict, method: str) -> list[np.ndarray]:
    """reflora's masks in the order PEFT draws them: per module, all A's then all B's (or the deltas)."""
    order = []
    for mod in MODULES:
        row = masks[mod]
        if method.endswith("_svd"):
            order += [m["delta"] for m in row]
        else:
            order += [m["A"] for m in row] + [m["B"] for m in row]
    return order


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("majority", ["total", "frequency"])
def test_dare_with_the_same_masks_equals_peft(method, majority):
    model, ours = build(PLAIN, seed=2)
    density = 0.55
    masks = reflora.dare_masks(ours, method=method, density=density, seed=7)
    kw = {"majority_sign_method": majority} if method == "dare_ties" else {}
    got = _ours(ours, WEIGHTS, method, density=density, masks=masks, **kw)
    with bernoulli_from(_peft_mask_order(masks, method), density):
        ref = run_peft(model, WEIGHTS, method, density=density, **kw)
    for mod in MODULES:
        np.testing.assert_array_equal(got[mod].A, ref[mod]["A"], err_msg=f"{method} {mod} A")
        np.testing.assert_array_equal(got[mod].B, ref[mod]["B"], err_msg=f"{method} {mod} B")
    # seed= draws those same masks
    again = _ours(ours, WEIGHTS, method, density=density, seed=7, **kw)
    for mod in MODULES:
        np.testing.assert_array_equal(again[mod].A, got[mod].A)


@pytest.mark.parametrize("method,kw", [
    ("svd", {}),
    ("svd", {"svd_rank": 2}),
    ("svd", {"svd_rank": 5, "svd_full_matrices": False}),
    ("ties_svd", {"density": 0.5}),
    ("ties_svd", {"density": 0.4, "majority_sign_method": "frequency", "svd_rank": 4}),
    ("magnitude_prune_svd", {"density": 0.7}),
    ("dare_linear_svd", {"density": 0.6}),
    ("dare_ties_svd", {"density": 0.6, "svd_rank": 4}),
])
def test_svd_methods_equal_peft_in_delta_w(method, kw):
    model, ours = build(PLAIN, seed=3)
    if method.startswith("dare"):
        kw = {**kw, "masks": reflora.dare_masks(ours, method=method, density=kw["density"], seed=11)}
        with bernoulli_from(_peft_mask_order(kw["masks"], method), kw["density"]):
            ref = run_peft(model, WEIGHTS, method, **{k: v for k, v in kw.items() if k != "masks"})
    else:
        ref = run_peft(model, WEIGHTS, method, **kw)
    got = _ours(ours, WEIGHTS, method, **kw)
    k = kw.get("svd_rank", 3)
    for mod in MODULES:
        assert ref[mod]["scaling"] == 1.0 == got[mod].scale
        assert got[mod].A.shape == ref[mod]["A"].shape and got[mod].B.shape == ref[mod]["B"].shape
        mine, theirs = got[mod].B @ got[mod].A, ref[mod]["B"] @ ref[mod]["A"]
        # the bound is derived for the untruncated combination M; rebuild M from the untruncated method
        full = _ours(ours, WEIGHTS, method, **{**kw, "svd_rank": min(MODULES[mod])})
        M = full[mod].B @ full[mod].A
        err = np.linalg.norm(mine - theirs)
        assert err <= svd_tolerance(M, k), (method, mod, err, svd_tolerance(M, k))


def test_svd_clamp_equals_peft():
    """The clamp threshold is a quantile of the factors' entries, so it depends on the signs LAPACK gives the
    singular vectors: numpy and torch both call LAPACK's gesdd on the same float64 matrix here."""
    model, ours = build(PLAIN, seed=4)
    ref = run_peft(model, WEIGHTS, "svd", svd_clamp=0.9, svd_rank=2)
    got = _ours(ours, WEIGHTS, "svd", svd_clamp=0.9, svd_rank=2)
    for mod in MODULES:
        M = ref[mod]["B"] @ ref[mod]["A"]
        assert np.linalg.norm(got[mod].B @ got[mod].A - M) <= svd_tolerance(M, 2)
        # the clamp did something: without it the result differs by far more than the tolerance
        plain = _ours(ours, WEIGHTS, "svd", svd_rank=2)[mod]
        assert np.linalg.norm(plain.B @ plain.A - M) > 1e3 * svd_tolerance(M, 2)


def test_one_adapter_is_combined_linearly_as_in_peft():
    model, ours = build(PLAIN[:1], seed=5)
    ref = run_peft(model, [-0.8], "ties", density=0.5)  # PEFT switches to "linear" for one adapter
    got = _ours(ours, [-0.8], "ties", density=0.5)
    for mod in MODULES:
        np.testing.assert_array_equal(got[mod].A, ref[mod]["A"])
        np.testing.assert_array_equal(got[mod].B, ref[mod]["B"])
        np.testing.assert_allclose(got[mod].B @ got[mod].A, -0.8 * delta(ours[0][mod]), rtol=1e-13, atol=1e-13)


def test_cat_with_rank_pattern_equals_peft_in_delta_w():
    """cat: PEFT pads every module to Σ max-ranks with zero rows; reflora keeps each module's ΣR_i. Same ΔW."""
    specs = [dict(r=2, lora_alpha=4, rank_pattern={"lin0": 4}, alpha_pattern={"lin0": 3}),
             dict(r=3, lora_alpha=6, use_rslora=False)]
    model, ours = build(specs, seed=6)
    ref = run_peft(model, [1.5, -0.5], "cat")
    got = _ours(ours, [1.5, -0.5], "cat")
    assert got["lin0"].rank == 4 + 3 and got["lin1"].rank == 2 + 3
    for mod in MODULES:
        assert ref[mod]["A"].shape[0] == 4 + 3  # PEFT: the sum of each adapter's largest rank, for every module
        want = 1.5 * delta(ours[0][mod]) - 0.5 * delta(ours[1][mod])
        np.testing.assert_allclose(got[mod].B @ got[mod].A, want, rtol=0, atol=64 * U64 * np.abs(want).max())
        np.testing.assert_allclose(ref[mod]["B"] @ ref[mod]["A"], want, rtol=0, atol=64 * U64 * np.abs(want).max())


# ---------------------------------------------------------------- PEFT's known defects, documented


def test_3004_linear_mixes_factors_cross_terms():
    """#3004: "linear" sums the A's and the B's separately, so B A has cross terms B_i A_j (i != j).
    With weights [1, -1] it is (B1 + B2)(A1 - A2), not ΔW1 - ΔW2. reflora's "linear" reproduces PEFT's
    factors (the method is defined that way); "exact" is the sum of the updates."""
    model, ours = build(PLAIN[:2], seed=8)
    ref = run_peft(model, [1.0, -1.0], "linear")
    lin = _ours(ours, [1.0, -1.0], "linear")
    ex = _ours(ours, [1.0, -1.0], "exact")
    for mod in MODULES:
        a, b = ours[0][mod], ours[1][mod]
        want = delta(a) - delta(b)
        cross = math.sqrt(a.scale * b.scale) * (b.B @ a.A - a.B @ b.A)
        np.testing.assert_array_equal(lin[mod].A, ref[mod]["A"])
        got_linear = lin[mod].B @ lin[mod].A
        # PEFT's linear = the sum plus exactly the cross terms
        np.testing.assert_allclose(got_linear, want + cross, rtol=0, atol=64 * U64 * np.abs(want + cross).max())
        assert np.linalg.norm(got_linear - want) > 0.3 * np.linalg.norm(want)
        np.testing.assert_allclose(ex[mod].B @ ex[mod].A, want, rtol=0, atol=64 * U64 * np.abs(want).max())


@pytest.mark.parametrize("method", ["cat", "linear", "svd"])
def test_3449_rslora_combined_adapter_is_sqrt_r_too_large_in_peft(method):
    """#3449/#3473/#3761: the combined config inherits use_rslora, so PEFT's scaling is new_r / sqrt(new_r) =
    sqrt(new_r) instead of 1. One rsLoRA adapter with weight 1 must give back its own ΔW."""
    spec = [dict(r=4, lora_alpha=8, use_rslora=True)]
    model, ours = build(spec, seed=9)
    ref = run_peft(model, [1.0], method)
    got = _ours(ours, [1.0], method)
    for mod in MODULES:
        want = delta(ours[0][mod])
        peft_dw = ref[mod]["scaling"] * ref[mod]["B"] @ ref[mod]["A"]
        assert ref[mod]["scaling"] == pytest.approx(2.0)  # sqrt(4)
        np.testing.assert_allclose(peft_dw, 2.0 * want, rtol=1e-12, atol=1e-12 * np.abs(want).max())
        assert got[mod].scale == 1.0 and not got[mod].use_rslora
        np.testing.assert_allclose(got[mod].scale * got[mod].B @ got[mod].A, want, rtol=0,
                                   atol=64 * U64 * np.abs(want).max())


def test_3761_lora_bias_is_dropped_by_peft():
    """#3761: PEFT's combined lora_B.bias stays at its initial zero; the bias part of the update,
    s c, combines like the rest: c' = Σ w_i s_i c_i (with the result's scale 1)."""
    specs = [dict(r=3, lora_alpha=5, lora_bias=True), dict(r=3, lora_alpha=2, lora_bias=True)]
    model, ours = build(specs, seed=10)
    ref = run_peft(model, [0.6, 1.1], "cat")
    got = _ours(ours, [0.6, 1.1], "cat")
    for mod in MODULES:
        want = 0.6 * ours[0][mod].scale * ours[0][mod].lora_bias + 1.1 * ours[1][mod].scale * ours[1][mod].lora_bias
        assert not np.any(ref[mod]["lora_bias"])  # PEFT: all zero
        # two products and a sum per entry, each rounded once: |error| <= 4 u (|t0| + |t1|)
        terms = [w * ad.scale * np.abs(ad.lora_bias) for w, ad in ((0.6, ours[0][mod]), (1.1, ours[1][mod]))]
        assert np.all(np.abs(got[mod].scale * got[mod].lora_bias - want) <= 4 * U64 * (terms[0] + terms[1]))
        # and the combined layer's output is the weighted sum of the two layers' LoRA outputs
        x = np.random.default_rng(0).standard_normal((4, MODULES[mod][0]))
        y_a, y_b = (peft_output(model, n, x, mod) for n in ("a0", "a1"))
        base = x @ ours[0][mod].W.T + ours[0][mod].bias
        y_got = layer(got[mod]).forward(x)
        np.testing.assert_allclose(y_got - base, 0.6 * (y_a - base) + 1.1 * (y_b - base), rtol=0,
                                   atol=1e-13 * np.abs(y_a - base).max())


def _dora_update(ad) -> np.ndarray:
    """DoRA's effective ΔW = diag(m / ||W + s B A||)(W + s B A) - W (formed here only to check)."""
    V = ad.W + ad.scale * ad.B @ ad.A
    return (ad.magnitude / np.linalg.norm(V, axis=1))[:, None] * V - ad.W


def test_3761_dora_single_adapter_peft_keeps_initial_magnitude():
    """#3761: one DoRA adapter with weight 1. PEFT keeps the new magnitude at ||W|| (its value at creation)
    and ignores the source's m, so the layer changes; reflora's exact combination is the same layer."""
    model, ours = build([dict(r=3, lora_alpha=5, use_dora=True)], seed=12)
    ref = run_peft(model, [1.0], "linear")
    got = _ours(ours, [1.0], "exact")
    x = np.random.default_rng(1).standard_normal((5, 7))
    for mod in MODULES:
        ad = ours[0][mod]
        np.testing.assert_allclose(ref[mod]["magnitude"], np.linalg.norm(ad.W, axis=1), rtol=1e-12)
        y_src = peft_output(model, "a0", x if mod == "lin0" else x[:, :6], mod)
        y_peft = peft_output(model, "comb", x if mod == "lin0" else x[:, :6], mod)
        y_ours = layer(got[mod]).forward(x if mod == "lin0" else x[:, :6])
        assert np.abs(y_peft - y_src).max() > 1e-3 * np.abs(y_src).max()
        np.testing.assert_allclose(y_ours, y_src, rtol=0, atol=1e-12 * np.abs(y_src).max())


def _peft_dora_stack(model, names, x):
    layer = model.base_model.model.lin0
    model.base_model.set_adapter(list(names))
    with torch.no_grad():
        return layer(torch.from_numpy(x)).numpy()


def test_3608_several_dora_adapters_on_one_target():
    """#3608: several DoRA adapters active on one layer. PEFT 0.21.2's eval forward feeds the running result
    (base output plus the adapters before) to the next DoRA adapter as its "base output", so the layer is the
    composition diag(c2)(diag(c1)(W + s1 B1 A1) + s2 B2 A2), c_i = m_i / ||W + s_i B_i A_i||: order-dependent,
    and the second adapter rescales the first one's update. Its merge now agrees with that forward (#3609).
    The combination of the adapters' updates is W + ΔW1 + ΔW2, symmetric; reflora.combine(method="exact")
    gives one DoRA adapter with exactly that, and the difference to PEFT's stack is the cross term
    (c2 - 1) * ΔW1."""
    import copy

    model, ours = build([dict(r=3, lora_alpha=5, use_dora=True), dict(r=2, lora_alpha=3, use_dora=True)],
                        seed=13, scale_b=0.5)
    a, b = ours[0]["lin0"], ours[1]["lin0"]
    x = np.random.default_rng(2).standard_normal((5, 7))
    c = [ad.magnitude / np.linalg.norm(ad.W + ad.scale * ad.B @ ad.A, axis=1) for ad in (a, b)]
    d1, d2 = _dora_update(a), _dora_update(b)
    tol = 1e-12 * np.abs(x @ a.W.T).max()
    # PEFT's semantics: the composition, in the order the adapters are active
    y_ab = _peft_dora_stack(model, ["a0", "a1"], x)
    stack = c[1][:, None] * (c[0][:, None] * (a.W + a.scale * a.B @ a.A) + b.scale * b.B @ b.A)
    np.testing.assert_allclose(y_ab, x @ stack.T + a.bias, rtol=0, atol=tol)
    y_ba = _peft_dora_stack(model, ["a1", "a0"], x)
    assert np.abs(y_ab - y_ba).max() > 1e-3 * np.abs(y_ab).max()  # order-dependent
    with torch.no_grad():
        model.base_model.set_adapter(["a0", "a1"])
        merged = copy.deepcopy(model).merge_and_unload().lin0(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(merged, y_ab, rtol=0, atol=tol)  # fixed in 0.21.2 (PR #3609)
    # reflora: the sum of the two updates, as one DoRA adapter, in either order
    want = x @ (a.W + d1 + d2).T + a.bias
    for pair in ([ours[0], ours[1]], [ours[1], ours[0]]):
        got = _ours(pair, [1.0, 1.0], "exact")["lin0"]
        assert got.magnitude is not None and got.rank == 5
        np.testing.assert_allclose(layer(got).forward(x), want, rtol=0, atol=tol)
    # PEFT's stack minus the sum of the updates is the cross term (c2 - 1) * ΔW1
    np.testing.assert_allclose(y_ab - want, x @ ((c[1] - 1)[:, None] * d1).T, rtol=0, atol=tol)


def test_3737_rank_pattern_results_reload(tmp_path):
    """#3737: linear/ties/dare/magnitude_prune keep each module's source rank, but PEFT writes r = the largest
    rank and rank_pattern = {}, so from_pretrained builds the wrong shapes. reflora's result keeps each module's
    rank in its LoraAdapter; saved with reflora.save_peft (which writes rank_pattern) PEFT loads it back."""
    import peft

    specs = [dict(r=2, lora_alpha=4, rank_pattern={"lin0": 4}), dict(r=2, lora_alpha=6, rank_pattern={"lin0": 4})]
    model, ours = build(specs, seed=14)
    ref = run_peft(model, [0.5, 0.5], "linear")
    cfg = model.peft_config["comb"]
    assert cfg.r == 4 and cfg.rank_pattern == {} and ref["lin1"]["A"].shape[0] == 2  # the defect
    model.save_pretrained(str(tmp_path / "peft"), selected_adapters=["comb"])
    with pytest.raises(RuntimeError, match="size mismatch"):
        peft.PeftModel.from_pretrained(type(model.base_model.model)().double(), str(tmp_path / "peft" / "comb"))
    got = _ours(ours, [0.5, 0.5], "linear")
    assert got["lin0"].rank == 4 and got["lin1"].rank == 2
    for mod in MODULES:
        np.testing.assert_array_equal(got[mod].A, ref[mod]["A"])
    reflora.save_peft(tmp_path / "ours", {m: layer(c) for m, c in got.items()})
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] and not saved["use_rslora"]
    base = model.base_model.model
    fresh = type(base)().double()
    fresh.load_state_dict({k: v for k, v in base.state_dict().items() if "lora" not in k and "base_layer" not in k}
                          | {k.replace(".base_layer", ""): v for k, v in base.state_dict().items()
                             if "base_layer" in k})
    loaded = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "ours"))
    for mod in MODULES:
        lay = getattr(loaded.base_model.model, mod)
        np.testing.assert_array_equal(lay.lora_A["default"].weight.detach().numpy(), got[mod].A)
        assert lay.scaling["default"] == 1.0
    assert os.path.exists(tmp_path / "ours" / "adapter_model.safetensors")


# ---------------------------------------------------------------- hypothesis: ranks, alphas, weights


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=12, deadline=None)
@given(n=st.integers(2, 3), r=st.integers(1, 5), alphas=st.lists(st.sampled_from([1, 3, 8, 16]), min_size=3,
                                                                  max_size=3),
       ws=st.lists(st.floats(-2, 2, allow_nan=False).filter(lambda v: abs(v) > 1e-3), min_size=3, max_size=3),
       seed=st.integers(0, 1000), method=st.sampled_from(["cat", "linear", "ties", "magnitude_prune"]),
       rsl=st.lists(st.booleans(), min_size=3, max_size=3))
def test_factorwise_equal_peft_hypothesis(n, r, alphas, ws, seed, method, rsl):
    """PEFT's factors are right (each source scale, rsLoRA included, is folded in); its new scale is 1 only
    when the first adapter is not rsLoRA (#3449), else sqrt(new rank)."""
    kw = {"density": 0.5} if method in ("ties", "magnitude_prune") else {}
    with float64_default():
        model, ours = build([dict(r=r, lora_alpha=a, use_rslora=f) for a, f in zip(alphas[:n], rsl)], seed=seed)
        ref = run_peft(model, ws[:n], method, **kw)
    got = reflora.combine(ours, ws[:n], method=method, **kw)
    for mod in MODULES:
        np.testing.assert_array_equal(got[mod].A, ref[mod]["A"])
        np.testing.assert_array_equal(got[mod].B, ref[mod]["B"])
        new_r = got[mod].rank
        assert got[mod].scale == 1.0
        assert ref[mod]["scaling"] == pytest.approx(math.sqrt(new_r) if rsl[0] else 1.0, rel=1e-15)


def test_svd_default_rank_is_the_largest_module_rank_not_the_configured_r():
    """PEFT's svd default rank is max(r, *rank_pattern.values()) from each config; reflora sees only the modules.
    With a rank_pattern that lowers every module to 2 below r = 4, PEFT keeps rank 4 (here the exact sum of two
    rank-2 updates) and reflora truncates to 2 unless given svd_rank=4, which reproduces PEFT."""
    specs = [dict(r=4, lora_alpha=4, rank_pattern={"lin0": 2, "lin1": 2}) for _ in range(2)]
    model, ours = build(specs, seed=8)
    ref = run_peft(model, [1.0, -0.5], "svd")
    default = _ours(ours, [1.0, -0.5], "svd")
    asked = _ours(ours, [1.0, -0.5], "svd", svd_rank=4)
    for mod in MODULES:
        want = delta(ours[0][mod]) - 0.5 * delta(ours[1][mod])
        assert ref[mod]["A"].shape[0] == 4 and default[mod].rank == 2 and asked[mod].rank == 4
        tol = svd_tolerance(want, 4)
        assert np.linalg.norm(ref[mod]["B"] @ ref[mod]["A"] - want) <= tol
        assert np.linalg.norm(asked[mod].B @ asked[mod].A - want) <= tol
        assert np.linalg.norm(default[mod].B @ default[mod].A - want) > 0.1 * np.linalg.norm(want)
