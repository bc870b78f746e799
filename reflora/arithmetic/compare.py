"""Compare two adapters by what they do: per-module ΔW agreement, and a verdict naming the
likely cause when they differ.

For modules present on both sides (matched by path; a kohya LoRA name also matches the
dotted path it mangles), with a = ΔW of the first and b = ΔW of the second, both in
float64 (``reflora.arithmetic.delta``):

    max_abs_diff = max |a - b|,      rel = max_abs_diff / max |b|
    equal        rel <= rtol (rtol = 0: bit-identical ΔW)
    factor       c = <a, b> / <b, b>, the least-squares constant with a ≈ c b

When a = c b holds to ``PROPORTIONAL_RTOL``, c is named: sqrt(R) (rsLoRA read as plain
LoRA or the reverse), R (a scale stored where alpha belongs, as mlx-lm's ``scale``
read as alpha, or alpha read as a scale), s (one side applies no scale: alpha missing,
as kohya's dropped ``.alpha``), -1 (sign), 1 + O(2^-24) (a scale rounded to float32,
as GGUF's alpha). a ≈ c bᵀ is "transposed layout" ((I, R)/(R, O) files read as (R, I)/
(O, R)); rows of a equal to rows of b in another order is "rows permuted" (Llama's q/k
permutation in GGUF not undone). A module on one side only is "missing module". A
difference that is no factor but within 2^-22 / 2^-9 / 2^-6 relative is named as float32 /
float16 / bfloat16 rounding (a scale folded into the factors, a lower-precision copy).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple

import numpy as np

from ..adapter import LoraAdapter
from .delta import as_float64, delta_bias, delta_rows

__all__ = ["PROPORTIONAL_RTOL", "AdapterDiff", "ModuleDiff", "compare_adapters"]

#: a = c b "holds" when max|a - c b| <= PROPORTIONAL_RTOL max|a|. ΔW evaluated in float64 from
#: exactly converted factors carries relative errors ~R 2^-53 (1e-14 for R = 100); scales stored
#: in float32 (GGUF) are exact multiples. 1e-9 sits far above the first and far below any
#: real difference between two trained adapters; candidate factors are matched to 1e-6
#: relative (they differ from each other by far more: sqrt(2) at least, for R >= 2).
PROPORTIONAL_RTOL = 1e-9
_FACTOR_RTOL = 1e-6
_ROWS = 512  # rows of ΔW formed at a time
_PERMUTE_LIMIT = 1 << 22  # elements: the row-permutation check forms both ΔW whole


class ModuleDiff(NamedTuple):
    """One module's comparison. status: "identical", "equal", "differs", "missing"."""

    module: str
    other: str | None  # the matching name on the second side, when it differs
    status: str
    max_abs_diff: float
    rel: float
    factor: float | None
    verdict: str


class AdapterDiff(NamedTuple):
    """The whole comparison; ``ok`` when every module is identical or equal within rtol."""

    modules: list[ModuleDiff]
    rtol: float

    @property
    def ok(self) -> bool:
        return all(m.status in ("identical", "equal") for m in self.modules)

    def format(self) -> str:
        """The table ``reflora diff`` prints."""
        rows = [("module", "status", "max|ΔA-ΔB|", "rel", "factor", "verdict")]
        for m in self.modules:
            name = m.module if m.other in (None, m.module) else f"{m.module} ~ {m.other}"
            rows.append((name, m.status, f"{m.max_abs_diff:.3g}", f"{m.rel:.3g}",
                         "" if m.factor is None else f"{m.factor:.8g}", m.verdict))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5] for r in rows]
        n_bad = sum(m.status not in ("identical", "equal") for m in self.modules)
        lines.append(f"{len(self.modules)} modules: " + ("all agree" if not n_bad else f"{n_bad} differ")
                     + (" (rtol 0: bit-identical ΔW required)" if self.rtol == 0 else f" (rtol {self.rtol:g})"))
        return "\n".join(lines)


_PARTS = (("lora_unet_", "unet"), ("lora_te3_", "te3"), ("lora_te2_", "te2"), ("lora_te1_", "te1"),
          ("lora_te_", "te1"), ("lora_transformer_", "transformer"), ("unet.", "unet"), ("text_encoder_2.", "te2"),
          ("text_encoder.", "te1"), ("transformer.", "transformer"))


def mangled(name: str) -> str:
    """A name both a dotted module path and its kohya LoRA name reduce to ('unet:down_blocks_0_...')."""
    name = name.removeprefix("base_model.model.")
    for prefix, part in _PARTS:
        if name.startswith(prefix):
            return f"{part}:{name[len(prefix):].replace('.', '_')}"
    return "unet:" + name.replace(".", "_")  # kohya_name puts other paths under lora_unet_


def _match(a: Mapping[str, Any], b: Mapping[str, Any]) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    pairs = [(m, m) for m in a if m in b]
    rest_a = [m for m in a if m not in b]
    rest_b = [m for m in b if m not in a]
    ka, kb = {}, {}
    for m in rest_a:
        ka.setdefault(mangled(m), []).append(m)
    for m in rest_b:
        kb.setdefault(mangled(m), []).append(m)
    for k, ms in ka.items():
        if len(ms) == 1 and len(kb.get(k, ())) == 1:
            pairs.append((ms[0], kb[k][0]))
    used_a = {p[0] for p in pairs}
    used_b = {p[1] for p in pairs}
    return pairs, [m for m in a if m not in used_a], [m for m in b if m not in used_b]


def _stats(ad_a: LoraAdapter, ad_b: LoraAdapter, *, transposed: bool, factor: float | None = None,
           W_a: Any = None, W_b: Any = None) -> dict[str, float]:
    """Blockwise over rows of a: max|a - b'|, max|a|, max|b'|, <a,b'>, <b',b'> with b' = b or bᵀ (times factor)."""
    O = int(ad_a.B.shape[0])
    st = {"diff": 0.0, "max_a": 0.0, "max_b": 0.0, "ab": 0.0, "bb": 0.0, "equal": True}
    if transposed:
        A_b, B_b = as_float64(ad_b.A), as_float64(ad_b.B)  # bᵀ rows lo:hi = s (A_bᵀ[lo:hi]) B_bᵀ
    for lo in range(0, O, _ROWS):
        hi = min(O, lo + _ROWS)
        a = delta_rows(ad_a, lo, hi, W=W_a)
        b = ad_b.scale * (A_b.T[lo:hi] @ B_b.T) if transposed else delta_rows(ad_b, lo, hi, W=W_b)
        if factor is not None:
            b = factor * b
        st["equal"] &= bool(np.array_equal(a, b))
        st["diff"] = max(st["diff"], float(np.max(np.abs(a - b), initial=0.0)))
        st["max_a"] = max(st["max_a"], float(np.max(np.abs(a), initial=0.0)))
        st["max_b"] = max(st["max_b"], float(np.max(np.abs(b), initial=0.0)))
        st["ab"] += float(np.sum(a * b))
        st["bb"] += float(np.sum(b * b))
    return st


def _name_factor(c: float, ad_a: LoraAdapter, ad_b: LoraAdapter) -> str:
    def near(x: float) -> bool:
        return x != 0 and math.isfinite(x) and abs(c / x - 1.0) <= _FACTOR_RTOL

    if abs(c - 1.0) <= 2.0**-22:
        return (f"equal up to a factor 1 {'+' if c > 1 else '-'} {abs(c - 1):.2g}: a scale rounded on one side "
                "(e.g. GGUF's float32 adapter.lora.alpha), not a different adapter")
    causes = []
    for R in sorted({int(ad_a.config.rank), int(ad_b.config.rank)}):
        if R > 1 and near(math.sqrt(R)):
            causes.append(f"rsLoRA mix-up: the first side scales alpha/sqrt(R), the second alpha/R (factor "
                          f"sqrt(R) = sqrt({R}))")
        if R > 1 and near(1 / math.sqrt(R)):
            causes.append(f"rsLoRA mix-up: the first side scales alpha/R, the second alpha/sqrt(R) (factor "
                          f"1/sqrt(R), R = {R})")
        for k, (big, small) in ((R, ("first", "second")), (1 / R, ("second", "first"))):
            if R > 1 and near(k):
                causes.append(f"alpha vs scale: the {big} side's update is R = {R} times the {small}'s (alpha used "
                              "as the scale, or the scale divided by R again as if it were alpha; e.g. lora_alpha "
                              "written as mlx-lm's 'scale')")
    if ad_a.scale != 1 and near(ad_a.scale):
        causes.append(f"the second side applies no scale (s = 1 instead of {ad_a.scale:g}): alpha missing or "
                      "dropped (e.g. kohya's .alpha), or the scale applied twice on the first")
    if ad_b.scale != 1 and near(1 / ad_b.scale):
        causes.append(f"the first side applies no scale (s = 1 instead of {ad_b.scale:g}): alpha missing or "
                      "dropped (e.g. kohya's .alpha), or the scale applied twice on the second")
    if near(-1.0):
        causes.append("sign flipped")
    if causes:
        return "; or ".join(causes)
    return f"constant factor {c:.8g}: the scales differ (alpha or rank recorded differently)"


def _rows_permuted(ad_a: LoraAdapter, ad_b: LoraAdapter, W_a: Any, W_b: Any) -> float | None:
    """The factor c with the rows of a equal to the rows of c b in another order, or None.

    c = ±||a||_F / ||b||_F (a row permutation keeps the norm); rows are sorted
    lexicographically on both sides and compared to PROPORTIONAL_RTOL.
    """
    O, I = int(ad_a.B.shape[0]), int(ad_a.A.shape[1])
    if O * I > _PERMUTE_LIMIT or ad_b.B.shape[0] != O or ad_b.A.shape[1] != I:
        return None
    a, b = delta_rows(ad_a, 0, O, W=W_a), delta_rows(ad_b, 0, O, W=W_b)
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0 or nb == 0:
        return None
    sa = a[np.lexsort(a.T[::-1])]
    for c in (na / nb, -na / nb):
        cb = c * b
        sb = cb[np.lexsort(cb.T[::-1])]
        if np.max(np.abs(sa - sb)) <= PROPORTIONAL_RTOL * np.max(np.abs(a)):
            return c
    return None


def _compare_module(name: str, other: str, ad_a: LoraAdapter, ad_b: LoraAdapter, rtol: float,
                    W_a: Any, W_b: Any) -> ModuleDiff:
    sa = (int(ad_a.B.shape[0]), int(ad_a.A.shape[1]))
    sb = (int(ad_b.B.shape[0]), int(ad_b.A.shape[1]))
    plain = ad_a.magnitude is None and ad_b.magnitude is None
    if sa != sb and sa != sb[::-1]:
        return ModuleDiff(name, other, "differs", math.inf, math.inf, None,
                          f"shapes differ: ΔW (O, I) = {sa} vs {sb} (different modules or base models)")
    best = None
    for transposed in ([False] if sa == sb else []) + ([True] if sa == sb[::-1] and plain else []):
        st = _stats(ad_a, ad_b, transposed=transposed, W_a=W_a, W_b=W_b)
        rel = st["diff"] / st["max_b"] if st["max_b"] > 0 else (0.0 if st["diff"] == 0 else math.inf)
        if not transposed:
            ba, bb = delta_bias(ad_a), delta_bias(ad_b)
            if (ba is None) != (bb is None):
                return ModuleDiff(name, other, "differs", st["diff"], rel, None,
                                  "one side has a lora_bias (Δbias = s c), the other none")
            if ba is not None and not (np.array_equal(ba, bb) or np.max(np.abs(ba - bb)) <= rtol * np.max(np.abs(bb))):
                return ModuleDiff(name, other, "differs", st["diff"], rel, None, "the lora_bias updates (s c) differ")
            if st["equal"]:
                return ModuleDiff(name, other, "identical", 0.0, 0.0, 1.0, "bit-identical ΔW")
            if rel <= rtol:
                return ModuleDiff(name, other, "equal", st["diff"], rel, None, f"ΔW agree within rtol {rtol:g}")
        if st["max_b"] == 0 or st["max_a"] == 0:
            zero = "second" if st["max_b"] == 0 else "first"
            verdict = f"the {zero} side's ΔW is zero (lora_B all zeros: untrained, or its weights were dropped)"
            best = best or ModuleDiff(name, other, "differs", st["diff"], rel, None, verdict)
            continue
        if st["bb"] == 0:  # nonzero entries whose squares underflow (below about 1e-154): no factor to fit
            best = best or ModuleDiff(name, other, "differs", st["diff"], rel, None,
                                      "the second side's ΔW is nonzero but too small (< 1e-154) to fit a factor")
            continue
        c = st["ab"] / st["bb"]
        res = _stats(ad_a, ad_b, transposed=transposed, factor=c, W_a=W_a, W_b=W_b)
        if res["diff"] <= PROPORTIONAL_RTOL * res["max_a"]:
            verdict = _name_factor(c, ad_a, ad_b) if abs(c - 1.0) > 0 or not transposed else ""
            if transposed:
                verdict = ("transposed layout: ΔW of one side is the transpose of the other's (lora_a (I, R) / "
                           "lora_b (R, O) files, as mlx-lm and the seed write, read as PEFT's (R, I) / (O, R))"
                           + ("" if abs(c - 1.0) <= 2.0**-22 else f"; and {verdict}"))
            return ModuleDiff(name, other, "differs", st["diff"], rel, c, verdict)
        if best is None:
            verdict = "differs, not by a constant factor (different weights)"
            for bits, what in ((22, "float32"), (9, "float16"), (6, "bfloat16")):
                if rel <= 2.0**-bits:  # a few units of the format's 2^-(p) roundoff, relative to max|ΔW|
                    verdict = (f"differs by rounding only: relative {rel:.2g}, the size of {what} rounding of the "
                               f"factors (e.g. a scale folded into A and B, or a {what} copy); pass rtol >= {rel:.2g} "
                               "if that step is expected")
                    break
            perm = _rows_permuted(ad_a, ad_b, W_a, W_b) if plain and not transposed else None
            if perm is not None:
                verdict = ("rows permuted: the same rows of ΔW in another order (e.g. llama.cpp's q/k head "
                           "permutation in a GGUF file not undone: pass the right head counts)")
                if abs(perm - 1.0) > 2.0**-22:
                    verdict += f"; and {_name_factor(perm, ad_a, ad_b)}"
            best = ModuleDiff(name, other, "differs", st["diff"], rel, perm if perm is not None else c, verdict)
    return best


def compare_adapters(a: Any, b: Any, *, rtol: float = 0.0, W: Mapping[str, Any] | None = None) -> AdapterDiff:
    """Compare two adapters module by module by their ΔW (see the module docstring).

    Args:
      a, b: {module: LoraAdapter} mappings or single LoraAdapters (files of any format are
        read with ``reflora.load_any``; ``reflora diff`` takes paths).
      rtol: 0 demands bit-identical ΔW (what a lossless conversion gives); > 0 accepts
        max|ΔW_a - ΔW_b| <= rtol max|ΔW_b| (e.g. after a float16 save).
      W: {module: base weight (O, I)} for DoRA modules without their own.

    Returns:
      ``AdapterDiff(modules, rtol)``; ``.ok`` when everything agrees, ``.format()`` the table.

    Raises:
      ValueError: a negative or non-finite rtol; a DoRA module without a base weight.
      TypeError: inputs that are not adapters.

    Example:
      >>> import numpy as np, reflora
      >>> A, B = np.ones((4, 3)), np.ones((2, 4))
      >>> plain = reflora.LoraAdapter.from_arrays(A, B, alpha=8.0)
      >>> rs = reflora.LoraAdapter.from_arrays(A, B, alpha=8.0, use_rslora=True)
      >>> compare_adapters({"q": rs}, {"q": plain}).modules[0].verdict.split(":")[0]
      'rsLoRA mix-up'
    """
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not (rtol >= 0 and math.isfinite(rtol)):
        raise ValueError(f"rtol is {rtol!r}; expected a finite number >= 0")
    side = []
    for x, label in ((a, "a"), (b, "b")):
        if isinstance(x, LoraAdapter):
            x = {"": x}
        if not isinstance(x, Mapping) or not all(isinstance(v, LoraAdapter) for v in x.values()):
            raise TypeError(f"{label} is {type(x).__name__}; expected a LoraAdapter or {{module: LoraAdapter}} "
                            "(read files with reflora.load_any; `reflora diff` does)")
        side.append(x)
    ma, mb = side
    W = W or {}
    pairs, only_a, only_b = _match(ma, mb)
    out = [_compare_module(m, o, ma[m], mb[o], float(rtol), W.get(m), W.get(o)) for m, o in pairs]
    out += [ModuleDiff(m, None, "missing", math.inf, math.inf, None, "missing module: only in the first adapter")
            for m in only_a]
    out += [ModuleDiff(m, None, "missing", math.inf, math.inf, None, "missing module: only in the second adapter")
            for m in only_b]
    return AdapterDiff(out, float(rtol))
