"""Hypothesis strategies for serving problems (needs the ``test`` extra: hypothesis).

    serving_problems()   reflora.testing.serving_problems.ServingProblem

Draws: L adapters (1 to max_adapters), a rank per adapter in [0, max_rank]
(mixed, 0 included; R is the largest), per-row adapter indices including -1,
laid out as

    "unsorted"  every row an independent adapter or -1, in any order (bgmv, decode)
    "sorted"    contiguous segments, one adapter each, in random adapter order (sgmv, prefill)
    "long"      one segment of 145 to 200 rows (past punica's 144-row bug), with
                a few other rows around it

one scale per adapter (alpha/r-like values; powers of two for "int"
values, so that small integer problems are exact), dtype, seed, W and bias
presence, an expand slice (offset and tail columns) and, on request, extra
vocabulary tokens. Shrinks towards one adapter, rank 1, one row, no base.

With ``tp=T`` every drawn I, O and R is a multiple of T (equal shards).
With ``slices=True`` the output is 1 to 3 slices of unequal widths (qkv as
4k, k, k; gate_up as two equal halves; or free widths), one stack each.
"""

from __future__ import annotations

from typing import Sequence

from hypothesis import strategies as st

from .serving_problems import SERVING_DTYPES, ServingProblem

__all__ = ["LAYOUTS", "serving_problems"]

LAYOUTS = ("unsorted", "sorted", "long")
_SCALES = (1.0, 0.5, 2.0, 0.25, 4.0, 1.5, 0.75, 2.0**0.5, 3.0)
_POW2 = (1.0, 0.5, 2.0, 0.25, 4.0)


@st.composite
def serving_problems(draw, *, dtypes: Sequence[str] = ("float32",), max_adapters: int = 4, max_rank: int = 8,
                     max_size: int = 24, max_rows: int = 24, layouts: Sequence[str] = LAYOUTS,
                     values: Sequence[str] = ("uniform", "int"), W: bool | None = None, bias: bool | None = None,
                     extra_vocab: bool = False, tp: int | None = None, min_rank: int = 0,
                     slices: bool = False) -> ServingProblem:
    """A ``ServingProblem`` (see the module docstring for what varies)."""
    for d in dtypes:
        if d not in SERVING_DTYPES:
            raise ValueError(f"dtype {d!r}; expected one of {SERVING_DTYPES}")
    T = tp or 1
    L = draw(st.integers(1, max_adapters))
    if tp:
        R = T * draw(st.integers(1, max(1, max_rank // T)))
        ranks = [draw(st.integers(0, R)) for _ in range(L)]
        ranks[draw(st.integers(0, L - 1))] = R
    else:
        ranks = [draw(st.integers(min_rank, max_rank)) for _ in range(L)]
    I = T * draw(st.integers(1, max(1, max_size // T)))
    O = T * draw(st.integers(1, max(1, max_size // T)))
    widths = ()
    if slices:
        # 1 to 3 unequal slices: qkv-like (q, k, k) or gate_up-like (g, g) or free widths
        kind = draw(st.sampled_from(["qkv", "gate_up", "free"]))
        kv = draw(st.integers(1, 4))
        widths = {"qkv": (4 * kv, kv, kv), "gate_up": (2 * kv, 2 * kv)}.get(kind) or tuple(
            draw(st.lists(st.integers(1, 8), min_size=1, max_size=3)))
        O = sum(widths)
    layout = draw(st.sampled_from(list(layouts)))
    adapter = st.integers(-1, L - 1)
    if layout == "unsorted":
        indices = draw(st.lists(adapter, min_size=1, max_size=max_rows))
    elif layout == "sorted":
        segs = draw(st.lists(st.tuples(adapter, st.integers(1, 8)), min_size=1, max_size=max(1, max_rows // 4)))
        indices = [a for a, n in segs for _ in range(n)]
    else:
        before = draw(st.lists(adapter, max_size=3))
        after = draw(st.lists(adapter, max_size=3))
        a = draw(st.integers(0, L - 1))
        indices = before + [a] * draw(st.integers(145, 200)) + after
    kind = draw(st.sampled_from(list(values)))
    pool = _POW2 if kind == "int" else _SCALES
    scales = tuple(draw(st.sampled_from(pool)) for _ in range(L))
    return ServingProblem(
        I=I, O=O, ranks=tuple(ranks), indices=tuple(indices), scales=scales,
        dtype=draw(st.sampled_from(list(dtypes))), seed=draw(st.integers(0, 2**16)),
        W=draw(st.booleans()) if W is None else W, bias=draw(st.booleans()) if bias is None else bias,
        values=kind, offset=draw(st.integers(0, 4)), tail=draw(st.integers(0, 4)),
        X=draw(st.integers(0, 3)) if extra_vocab else 0, slices=widths)
