"""check_combine: does a candidate combine LoRA adapters by what they do (their ΔW)?

Candidate protocol (arrays in the candidate's library, as ``to=`` converts them)::

    combine(adapters, weights) -> adapter
      adapters: a list of dicts {"A": (R_i, I), "B": (O, R_i), "alpha": float, "use_rslora": bool}
                (DoRA problems add "magnitude": (O,) and "W": (O, I), the base weight)
      weights:  a list of floats, one per adapter
      returns:  a dict {"A": (R', I), "B": (O, R'), "alpha": float, "use_rslora": bool}
                (plus "magnitude": (O,) when the result is a DoRA adapter on the same W,
                "lora_bias": (O,) when the inputs have one: lora_bias problems add it)

An adapter's update is ΔW = s B A, s = alpha / R (alpha / sqrt(R) with use_rslora); a
DoRA adapter's is diag(m / ||W + s B A||_row)(W + s B A) - W. The check needs nothing
of the candidate's method except that its result's update is the weighted sum of the
inputs' updates, Σ w_i ΔW_i (PEFT's "cat", its "svd" family at full rank, reflora's
"exact"; not the factor-wise "linear"/"ties"/DARE, whose cross terms are the point of
PEFT #3004). With ``exact=False`` only what every method owes is checked (one adapter).

Checks, on problems drawn with hypothesis (shapes, ranks, rsLoRA flags, weights):
  identity      combine([a], [1]) has a's update
  scaling       combine([a], [c]) and combine([a], [-c]) have ±c times a's update
  sum           combine(as, w) has Σ w_i ΔW_i                         (exact=True)
  linearity     combine(as, c w) = c combine(as, w), candidate against itself  (exact=True)
  cat           combine([a, b], [1, 1]) has ΔW_a + ΔW_b               (exact=True)
  lora_bias     (lora_bias=True) every check above includes the bias update s c, as one more
                column of ΔW: [ΔW | s c]
  rsLoRA        an rsLoRA adapter and the plain adapter with the same A, B and scale
                (alpha' = alpha R / sqrt(R)) combine to the same update     (rslora=True)

Tolerance, derived (Frobenius norm, u the unit roundoff of ``dtype``). Inputs are
rounded to ``dtype`` once and the reference M = Σ w_i ΔW_i is computed from those
in float64. A correct candidate returns factors that are (i) the rounding of exact
factors B*, A* with s' B* A* = M + E, so rounding them adds at most 2u ||s'|B*||A*|||_F;
for a concatenation |B*||A*| = T = Σ|w_i s_i||B_i||A_i|, for an SVD-based result
||s'|B*||A*|||_F <= the nuclear norm ||M||_*; and (ii) E, the error of forming its
factors: each entry of T-type products carries at most (R + n + 2) roundings, and a
backward-stable SVD of a formed M adds ||E||_F <= c O I u_w ||M||_F (Householder
bidiagonalisation, Higham, Accuracy and Stability, ch. 19: γ~_(OI)), c = 16; LAPACK's
gesdd as NumPy calls it measured at most 10.3 O I u ||M||_F (99 u ||M||_F) on 60,000
random sums of rank-1..6 terms up to 8 x 8. u_w is the SVD's working precision: the
dtype's, but float32 for float16/bfloat16 (no library computes an SVD in half precision). So

    tol = u [ (R_tot + n + 4) ||T||_F + 2 ||M||_* ] + 16 O I u_w ||M||_F  + float64's u ||T|| term

plus, for DoRA, (I + 8) u ||Σ|w_i| |c_i| (|W| + |s_i||B_i||A_i|) + |W| ||_F for the row
norms. The defects these checks exist for change ΔW by a constant fraction of ||M||
(sqrt(R) - 1 for rsLoRA, the cross terms, the magnitude), far above tol for the
shapes drawn (O, I <= 8): the tests run each as a mutant in every dtype.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import numpy as np

from ..backend import to_numpy

__all__ = ["CombineProblem", "check_combine", "check_combine_problem"]

_DTYPES = ("float64", "float32", "float16", "bfloat16")
_U = {"float64": 2.0 ** -53, "float32": 2.0 ** -24, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}


@dataclasses.dataclass(frozen=True)
class CombineProblem:
    """One drawn case; the arrays come from ``numpy.random.default_rng(seed)`` (see ``arrays``)."""

    O: int
    I: int
    ranks: tuple
    rslora: tuple
    alphas: tuple
    weights: tuple
    seed: int = 0
    dtype: str = "float32"
    dora: bool = False
    lora_bias: bool = False

    def arrays(self) -> list[dict[str, np.ndarray]]:
        """The adapters as host arrays in ``dtype`` (float64 copies: exactly the rounded values)."""
        rng = np.random.default_rng(self.seed)
        dt = _np_dtype(self.dtype)
        W = rng.standard_normal((self.O, self.I)).astype(dt).astype(np.float64) if self.dora else None
        out = []
        for R, rs, alpha in zip(self.ranks, self.rslora, self.alphas):
            ad = {"A": rng.standard_normal((R, self.I)).astype(dt).astype(np.float64),
                  "B": (0.5 * rng.standard_normal((self.O, R))).astype(dt).astype(np.float64),
                  "alpha": float(alpha), "use_rslora": bool(rs)}
            if self.dora:
                s = _scale(alpha, R, rs)
                n = np.linalg.norm(W + s * ad["B"] @ ad["A"], axis=1)
                ad["magnitude"] = (n * rng.uniform(0.8, 1.2, self.O)).astype(dt).astype(np.float64)
                ad["W"] = W
            out.append(ad)
        if self.lora_bias:  # drawn last: the other arrays do not depend on it
            for ad in out:
                ad["lora_bias"] = rng.standard_normal(self.O).astype(dt).astype(np.float64)
        return out


def _np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes  # noqa: PLC0415 - a reflora dependency

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _scale(alpha: float, R: int, rslora: bool) -> float:
    return alpha / (math.sqrt(R) if rslora else R)


def _to_host(a: Any, what: str) -> np.ndarray:
    if type(a).__module__.startswith("torch"):
        t = a.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return t.numpy().astype(np.float64)
    try:
        return np.asarray(to_numpy(a)).astype(np.float64)
    except Exception as exc:  # noqa: BLE001
        raise CheckFailure(f"{what} is {type(a).__name__}; expected an array") from exc


class CheckFailure(Exception):
    pass


def _update(ad: dict) -> np.ndarray:
    """ΔW of a host adapter dict (float64), DoRA's effective update when it has a magnitude; with a
    lora_bias c, the bias update s c as one more column, [ΔW | s c] (the input x extended by a 1)."""
    R = ad["A"].shape[0]
    s = _scale(ad["alpha"], R, ad["use_rslora"])
    lora = s * ad["B"] @ ad["A"]
    if ad.get("magnitude") is not None:
        V = ad["W"] + lora
        return (ad["magnitude"] / np.linalg.norm(V, axis=1))[:, None] * V - ad["W"]
    if ad.get("lora_bias") is not None:
        return np.concatenate([lora, s * ad["lora_bias"][:, None]], axis=1)
    return lora


def _tolerance(ads: list[dict], weights: Sequence[float], M: np.ndarray, dtype: str) -> float:
    O, I = M.shape  # I + 1 columns with a lora_bias
    R_tot, n = sum(a["A"].shape[0] for a in ads), len(ads)
    T = np.zeros_like(M)
    D = np.zeros_like(M)
    for a, w in zip(ads, weights):
        s = _scale(a["alpha"], a["A"].shape[0], a["use_rslora"])
        sBA = abs(s) * np.abs(a["B"]) @ np.abs(a["A"])
        if a.get("lora_bias") is not None:
            sBA = np.concatenate([sBA, abs(s) * np.abs(a["lora_bias"])[:, None]], axis=1)
        T += abs(w) * sBA
        if a.get("magnitude") is not None:
            V = a["W"] + s * a["B"] @ a["A"]
            c = np.abs(a["magnitude"] / np.linalg.norm(V, axis=1))[:, None]
            D += abs(w) * c * (np.abs(a["W"]) + sBA)
    if any(a.get("magnitude") is not None for a in ads):
        D += np.abs(ads[0]["W"])
    nuclear = float(np.sum(np.linalg.svd(M, compute_uv=False))) if M.size else 0.0
    tT, tD, tM = float(np.linalg.norm(T)), float(np.linalg.norm(D)), float(np.linalg.norm(M))
    u, u64 = _U[dtype], _U["float64"]
    u_w = _U["float32"] if dtype in ("float16", "bfloat16") else u  # an SVD's working precision
    # rounding the factors + forming them; an SVD's backward error; the float64 reference's own error
    return (u * ((R_tot + n + 4) * tT + 2 * nuclear + (I + 8) * tD) + 16 * O * I * u_w * tM
            + u64 * ((R_tot + n + 4) * tT + (I + 8) * tD))


def _to_candidate(ads: list[dict], conv: Callable, dtype: str) -> list[dict]:
    dt = _np_dtype(dtype)
    out = []
    for a in ads:
        c = {"A": conv(a["A"].astype(dt)), "B": conv(a["B"].astype(dt)), "alpha": a["alpha"],
             "use_rslora": a["use_rslora"]}
        if a.get("magnitude") is not None:
            c["magnitude"] = conv(a["magnitude"].astype(dt))
            c["W"] = conv(a["W"].astype(dt))
        if a.get("lora_bias") is not None:
            c["lora_bias"] = conv(a["lora_bias"].astype(dt))
        out.append(c)
    return out


def _result_update(res: Any, W: np.ndarray | None, what: str, bias: bool = False) -> np.ndarray:
    if not isinstance(res, dict) or not {"A", "B", "alpha", "use_rslora"} <= set(res):
        raise CheckFailure(f"{what} returned {type(res).__name__}; expected a dict with A, B, alpha, use_rslora")
    A, B = _to_host(res["A"], f"{what}['A']"), _to_host(res["B"], f"{what}['B']")
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
        raise CheckFailure(f"{what} returned A {A.shape} and B {B.shape}; expected (R', I) and (O, R')")
    ad = {"A": A, "B": B, "alpha": float(res["alpha"]), "use_rslora": bool(res["use_rslora"])}
    if res.get("magnitude") is not None:
        if W is None:
            raise CheckFailure(f"{what} returned a DoRA magnitude for plain LoRA inputs")
        ad["magnitude"], ad["W"] = _to_host(res["magnitude"], f"{what}['magnitude']"), W
    elif W is not None:
        raise CheckFailure(f"{what} returned no DoRA magnitude for DoRA inputs: the result's update is then s' B' A' and "
                           "drops the magnitudes' part of the inputs' updates")
    if res.get("lora_bias") is not None:
        if not bias:
            raise CheckFailure(f"{what} returned a lora_bias for inputs without one")
        ad["lora_bias"] = _to_host(res["lora_bias"], f"{what}['lora_bias']")
    elif bias:
        raise CheckFailure(f"{what} returned no lora_bias for inputs with one: the bias part of the update, "
                           "Σ w_i s_i c_i, is dropped (PEFT #3761)")
    return _update(ad)


def compare_tensor(label: str, got: np.ndarray, want: np.ndarray, tol: float) -> float:
    if got.shape != want.shape:
        raise CheckFailure(f"{label}: the result's update has shape {got.shape}; expected {want.shape}")
    err = float(np.linalg.norm(got - want))
    if not err <= tol:  # NaN fails too
        ratio = float(np.linalg.norm(got)) / max(float(np.linalg.norm(want)), 1e-300)
        hint = ""
        for f, why in ((math.sqrt(2), "sqrt(2)"), (2.0, "2 = sqrt(4)"), (math.sqrt(3), "sqrt(3)"),
                       (math.sqrt(8), "sqrt(8)")):
            if abs(ratio - f) < 1e-2 * f:
                hint = f" (||got|| / ||want|| = {ratio:.4g} ~ {why}: an rsLoRA scale sqrt(R') left on the result?)"
        raise CheckFailure(f"{label}: ||ΔW_got - ΔW_want||_F = {err:.3e} > tol {tol:.3e} "
                           f"(||ΔW_want||_F = {float(np.linalg.norm(want)):.3e}){hint}")
    return err / tol if tol > 0 else 0.0


def check_combine_problem(combine: Callable, problem: CombineProblem, *, to: Any = None, exact: bool = True,
                          rslora: bool = True) -> dict[str, float]:
    """Run every combine check on one problem; returns the worst err / tol per check (< 1 passes).

    Raises:
      AssertionError: a check failed (message: which, the errors, the reproduction).
    """
    from . import converter  # noqa: PLC0415 - the kit's public converter

    conv = converter(to)
    ads = problem.arrays()
    W = ads[0].get("W")
    ws = list(problem.weights)
    out: dict[str, float] = {}

    def call(label, sub, weights):
        try:
            res = combine(_to_candidate(sub, conv, problem.dtype), list(weights))
        except Exception as exc:  # noqa: BLE001 - a candidate that raises fails
            raise CheckFailure(f"{label}: the candidate raised {type(exc).__name__}: {exc}") from exc
        return _result_update(res, W, f"combine (the {label} check)", bias=problem.lora_bias)

    def expect(label, sub, weights):
        want = sum(w * _update(a) for a, w in zip(sub, weights))
        got = call(label, sub, weights)
        tol = _tolerance(sub, weights, want, problem.dtype)
        out[label] = max(out.get(label, 0.0), compare_tensor(label, got, want, tol))
        return got, want, tol

    try:
        a = ads[0]
        expect("identity", [a], [1.0])
        c = ws[0]
        expect("scaling", [a], [c])
        expect("scaling", [a], [-c])
        if rslora:
            # the same A, B and scale, given as rsLoRA and as plain LoRA
            R = a["A"].shape[0]
            s = _scale(a["alpha"], R, a["use_rslora"])
            as_rs = {**a, "use_rslora": True, "alpha": s * math.sqrt(R)}
            as_plain = {**a, "use_rslora": False, "alpha": s * R}
            g_rs, want, tol = expect("rsLoRA", [as_rs], [c])
            g_plain = call("rsLoRA", [as_plain], [c])
            out["rsLoRA"] = max(out["rsLoRA"], compare_tensor("rsLoRA (plain vs rsLoRA form)", g_rs, g_plain, 2 * tol))
        if exact and len(ads) > 1:
            got, want, tol = expect("sum", ads, ws)
            k = 0.5 if problem.dora else -2.5  # DoRA: keep d = 1 + Σ k w_i (c_i - 1) away from 0
            got_k = call("linearity", ads, [k * w for w in ws])
            tol_k = _tolerance(ads, [k * w for w in ws], k * want, problem.dtype)
            out["linearity"] = compare_tensor("linearity: combine(as, c w) vs c combine(as, w)", got_k, k * got,
                                              tol_k + abs(k) * tol)
            expect("cat", ads[:2], [1.0, 1.0])
    except CheckFailure as exc:
        raise AssertionError(
            f"reflora.testing.check_combine: {exc}\n  problem: {problem!r}\nReproduce (reruns just this case):\n"
            f"    import reflora.testing as rt\n"
            f"    rt.check_combine_problem(combine, rt.{problem!r}"
            f"{'' if to is None or to == 'numpy' else f', to={to!r}'}{'' if exact else ', exact=False'}"
            f"{'' if rslora else ', rslora=False'})") from exc
    return out


def draw_problems(dtype: str, dora: bool, max_rank: int, rslora: bool, lora_bias: bool):
    from hypothesis import strategies as st  # noqa: PLC0415 - hypothesis only when a check runs

    @st.composite
    def draw(d):
        n = d(st.integers(1, 3))
        O, I = d(st.integers(1, 8)), d(st.integers(1, 8))
        ranks = tuple(d(st.integers(1, max_rank)) for _ in range(n))
        flags = tuple(d(st.booleans()) if rslora else False for _ in range(n))
        alphas = tuple(d(st.sampled_from([1.0, 2.0, 4.0, 8.0, 16.0])) for _ in range(n))
        # DoRA: |w| <= 1 and m / n in (0.8, 1.2) keep the combined d = 1 + Σ w_i (c_i - 1) >= 0.4 > 0 (representable)
        choice = [1.0, -1.0, 0.5, -0.75, 0.25] if dora else [1.0, -1.0, 0.5, -0.75, 1.5, 2.0, 0.25]
        weights = tuple(d(st.sampled_from(choice)) for _ in range(n))
        return CombineProblem(O=O, I=I, ranks=ranks, rslora=flags, alphas=alphas, weights=weights,
                              seed=d(st.integers(0, 2**31 - 1)), dtype=dtype, dora=dora,
                              lora_bias=lora_bias)

    return draw()


def check_combine(combine: Callable, *, dtype: str = "float32", to: Any = None, exact: bool = True,
                  dora: bool = False, rslora: bool = True, lora_bias: bool = False, max_examples: int = 50,
                  derandomize: bool = False,
                  seed: int | None = None, max_rank: int = 6):
    """Check that ``combine`` combines adapters by their updates (see the module docstring).

    Args:
      combine: the candidate, ``combine(adapters, weights) -> adapter`` (protocol above).
      dtype: "float64", "float32", "float16" or "bfloat16": the adapters' dtype.
      to: how arrays reach the candidate: "numpy" (default), "torch", "jax", "cupy",
        "array_api_strict" or a callable (``reflora.testing.converter``).
      exact: True checks sums of several adapters too; False only one-adapter identities
        (for approximate methods such as PEFT's "linear", "ties", DARE).
      dora: draw DoRA adapters (with "magnitude" and the base "W"); the result must be a
        DoRA adapter on W whose update is the weighted sum of the inputs' updates.
      lora_bias: give every adapter a lora_bias c (O,) (PEFT's bias on lora_B, scaled with
        the branch); the result must carry one with s' c' = Σ w_i s_i c_i. Not with dora.
      rslora: draw rsLoRA adapters too and check that the rsLoRA and plain forms of one
        update combine alike; False for a candidate that does not claim rsLoRA support.
      max_examples, derandomize, seed: hypothesis settings.
      max_rank: the largest rank drawn (>= 1).

    Returns:
      ``reflora.testing.CheckResult`` with the worst err / tol per check.

    Raises:
      AssertionError: the first failing case, with a reproduction.

    Example:
      >>> import reflora, reflora.testing as rt
      >>> def mine(adapters, weights):
      ...     ads = [reflora.LoraAdapter.from_arrays(a["A"], a["B"], alpha=a["alpha"], use_rslora=a["use_rslora"])
      ...            for a in adapters]
      ...     c = reflora.combine(ads, weights)
      ...     return {"A": c.A, "B": c.B, "alpha": c.alpha, "use_rslora": c.use_rslora}
      >>> rt.check_combine(mine, dtype="float64", max_examples=5, derandomize=True).examples
      5
    """
    from hypothesis import HealthCheck, Phase, given, settings  # noqa: PLC0415
    from hypothesis import seed as hseed  # noqa: PLC0415

    from . import CheckResult  # noqa: PLC0415

    if dtype not in _DTYPES:
        raise TypeError(f"dtype is {dtype!r}; expected one of {_DTYPES}")
    if isinstance(max_rank, bool) or not isinstance(max_rank, int):
        raise TypeError(f"max_rank is {max_rank!r} ({type(max_rank).__name__}); expected an int >= 1")
    if max_rank < 1:
        raise ValueError(f"max_rank is {max_rank!r}; expected an int >= 1")
    if dora and lora_bias:
        raise ValueError("dora and lora_bias together: PEFT's merge of the pair disagrees with its own forward, "
                         "and reflora does not define it")
    result = CheckResult("check_combine", dtype)

    @settings(max_examples=max_examples, derandomize=derandomize, deadline=None, database=None, print_blob=False,
              suppress_health_check=list(HealthCheck), report_multiple_bugs=False,
              phases=[Phase.explicit, Phase.generate, Phase.shrink])
    @given(draw_problems(dtype, dora, max_rank, rslora, lora_bias))
    def run(problem):
        result._note(check_combine_problem(combine, problem, to=to, exact=exact, rslora=rslora))

    if seed is not None and not derandomize:
        run = hseed(seed)(run)
    run()
    return result
