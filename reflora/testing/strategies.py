"""Hypothesis strategies for LoRA problems (needs the ``test`` extra: hypothesis).

    dtypes()            "float64", "float32", "float16", "bfloat16"
    leads()             leading dimensions of x: none, one or several
    dims() / ranks()    tiny (1-4) or moderate (5-32) sizes; ranks 1-8, so R > I happens
    scales()            alpha / R or alpha / sqrt(R) over common alphas, its negative, or 0
    configs()           reflora.LoraConfig
    problems()          reflora.testing.Problem: shapes, dtype, seed, scale, W, bias, dropout
    sgd_options()       reflora.testing.SGDOptions (momentum, dampening, nesterov, ...)
    training_problems() (Problem, SGDOptions) pairs: SGD steps smooth, every option visible
    arrays(), array_problems()
                        arrays drawn element by element through
                        hypothesis.extra.array_api (for your own properties)

Everything shrinks towards small shapes and simple values: one row, I = O = R
= 1, seed 0, integer-valued arrays, scale 1, no W/bias/dropout. The checks
draw ``problems()`` (seeded arrays, so a failure is reproduced by the printed
Problem alone); ``array_problems()`` shrinks the values themselves, when
you want to see the smallest failing numbers rather than the smallest seed.

Example:
  >>> from hypothesis import given
  >>> from reflora.testing import strategies as rst
  >>> @given(rst.problems(dtypes=["float32"]))
  ... def test_mine(p):
  ...     arrays = p.arrays()
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Sequence

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra.array_api import make_strategies_namespace

from ..config import LoraConfig
from .problems import VALUE_KINDS, Problem, SGDOptions
from .tolerance import DTYPES

__all__ = ["array_problems", "arrays", "configs", "dims", "dtypes", "leads", "problems", "ranks", "scales",
           "observable", "sgd_options", "stable_lr", "training_problems"]

ALPHAS = (1.0, 2.0, 8.0, 16.0, 32.0)
_XPS = None


def dtypes(allowed: Sequence[str] = DTYPES) -> st.SearchStrategy[str]:
    """One of ``allowed`` dtype names."""
    bad = [d for d in allowed if d not in DTYPES]
    if bad or not allowed:
        raise ValueError(f"dtypes {list(allowed)}; expected a non-empty subset of {DTYPES}")
    return st.sampled_from(tuple(allowed))


def _dim_values(max_size: int) -> tuple[int, ...]:
    tiny = tuple(range(1, min(4, max_size) + 1))
    moderate = tuple(range(5, max_size + 1))
    if not moderate:
        return tiny
    # tiny sizes repeated so that about half the draws are tiny; index 0 (size 1) is what shrinking reaches
    reps = max(1, len(moderate) // len(tiny))
    return tiny * reps + moderate


def dims(*, max_size: int = 32) -> st.SearchStrategy[int]:
    """A feature size: tiny (1-4) about half the time, moderate (5-max_size) otherwise; shrinks to 1.

    One ``sampled_from`` draw (cheaper for hypothesis than a ``one_of`` of two ranges).
    """
    return st.sampled_from(_dim_values(max_size))


def ranks(*, max_rank: int = 8) -> st.SearchStrategy[int]:
    """A rank R in 1..max_rank (drawn independently of I, so R > I occurs)."""
    return st.integers(1, max_rank)


#: leading dimensions of x, simplest first: one row, none (x is (I,)), one or several dims
LEADS = ((1,), (), (2,), (3,), (1, 1), (4,), (2, 3), (3, 1), (2, 2, 2), (1, 4, 2), (8,), (4, 4))


def leads(*, max_dims: int = 3, max_side: int = 4, min_rows: int = 1) -> st.SearchStrategy[tuple]:
    """Leading dimensions of x from ``LEADS``: () (x is (I,)), (N,), or several; shrinks to (1,)."""
    allowed = tuple(t for t in LEADS if len(t) <= max_dims and all(n <= max_side for n in t)
                    and math.prod(t) >= min_rows)
    if not allowed:
        raise ValueError(f"no leading dims with max_dims={max_dims}, max_side={max_side}, min_rows={min_rows}")
    return st.sampled_from(allowed)


#: the sign of the scale: positive, negative (a negated adapter, or unmerge), or 0 (an adapter switched off);
#: ``scale = scale or 1.0`` must fail
SIGNS = (1.0, -1.0, 0.0)
#: in_features of the wide problems (``problems(wide=True)``): long enough that accumulating x A^T in
#: bfloat16 or float16 instead of float32 shows
WIDE = (256, 1024)


@st.composite
def scales(draw, rank: int | None = None) -> float:
    """s = sign * alpha / R or sign * alpha / sqrt(R) (rsLoRA), sign 1, -1 or 0; shrinks to 1, plain scaling."""
    R = draw(ranks()) if rank is None else rank
    alpha = draw(st.sampled_from(ALPHAS))
    rslora = draw(st.booleans())
    return draw(st.sampled_from(SIGNS)) * alpha / (math.sqrt(R) if rslora else R)


@st.composite
def configs(draw, *, max_size: int = 32, max_rank: int = 8) -> LoraConfig:
    """A ``reflora.LoraConfig`` with small dimensions."""
    return LoraConfig(rank=draw(ranks(max_rank=max_rank)), alpha=draw(st.sampled_from(ALPHAS)),
                      in_features=draw(dims(max_size=max_size)), out_features=draw(dims(max_size=max_size)),
                      use_rslora=draw(st.booleans()))


def problems(*, dtypes: Sequence[str] = ("float32",), max_size: int = 32, max_rank: int = 8,
             max_lead_dims: int = 3, W: bool | None = None, bias: bool | None = None,
             dropout: bool | None = None, min_rows: int = 1,
             max_scale: float | None = None, wide: bool = False) -> st.SearchStrategy[Problem]:
    """``Problem``s; W, bias, dropout True/False force them, None lets hypothesis choose.

    ``max_scale`` caps |s| (training problems use 2, so a few SGD steps stay far from divergence).
    The scale is positive, negative or 0 (``SIGNS``). ``wide`` makes about one problem in four
    wide: I from ``WIDE`` (256 or 1024) whatever ``max_size``, where accumulating in half precision
    instead of float32 shows.

    ``min_rows`` > 1 asks for at least that many rows (the batched-vs-looped property).
    The strategy is built once from plain parts (no per-draw strategy construction),
    so drawing costs well under a millisecond.
    """
    lead = leads(max_dims=max_lead_dims, max_side=8, min_rows=min_rows)
    p_values = (0.0, 0.5, 0.25) if dropout is None else ((0.5, 0.25) if dropout else (0.0,))
    # the boolean and categorical parts in one draw, simplest first (fewer draws: less hypothesis overhead)
    flags = st.sampled_from(tuple(itertools.product(
        (False, True) if W is None else (W,), (False, True) if bias is None else (bias,), p_values,
        VALUE_KINDS, ALPHAS, (False, True), SIGNS)))
    in_dims = dims(max_size=max_size)
    if wide:
        in_dims = st.sampled_from(_dim_values(max_size) * 3 + WIDE * (len(_dim_values(max_size)) // 2 or 1))
    parts = st.tuples(globals()["dtypes"](dtypes), lead, in_dims, dims(max_size=max_size),
                      ranks(max_rank=max_rank), flags, st.integers(0, 2**16 - 1))

    def build(t):
        dtype, lead_, I, O, R, (has_W, has_bias, p_, values, alpha, rslora, sign), seed = t
        return Problem(lead=lead_, I=I, O=O, R=R, dtype=dtype, seed=seed,
                       scale=sign * alpha / (math.sqrt(R) if rslora else R), W=has_W, bias=has_bias, dropout=p_,
                       values=values)

    out = parts.map(build)
    return out if max_scale is None else out.filter(lambda p: abs(p.scale) <= max_scale)


@st.composite
def sgd_options(draw, *, max_steps: int = 4) -> SGDOptions:
    """SGD options valid for torch.optim.SGD: lr, momentum, dampening, weight decay, nesterov, maximize.

    Learning rates are small (<= 0.01) so that a few steps on ``problems(max_scale=2)``
    neither diverge nor amplify rounding errors chaotically (maximize ascends the loss).
    """
    lr = draw(st.sampled_from((0.01, 0.003, 0.001)))
    momentum = draw(st.sampled_from((0.0, 0.9, 0.5)))
    nesterov = momentum > 0 and draw(st.booleans())
    dampening = 0.0 if nesterov or momentum == 0 else draw(st.sampled_from((0.0, 0.5, 0.1)))
    weight_decay = draw(st.sampled_from((0.0, 0.1, 0.01)))
    return SGDOptions(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                      nesterov=nesterov, maximize=draw(st.booleans()), steps=draw(st.integers(1, max_steps)))


def stable_lr(problem: Problem, options: SGDOptions, *, max_change: float = 0.25) -> SGDOptions:
    """``options`` with lr capped so one step moves A and B by at most about ``max_change`` relative.

    The MSE loss L = mean((y - t)^2) has curvature in A and B of at most about
    C = 2 s^2 (|x|_F^2 |B|_F^2 + |x A^T|_F^2) / numel(y); momentum m multiplies
    the effective step by 1 / (1 - m). lr is capped at max_change (1 - m) / C
    (to two significant digits, so it prints plainly). Far from that cap,
    training is smooth and rounding errors are not amplified chaotically, so the
    emulated reference tracks a correct candidate; near or past it, SGD diverges
    and any two implementations part ways.
    """
    a = {k: None if v is None else v.astype(np.float64) for k, v in problem.arrays().items()}
    x = a["x"].reshape(-1, problem.I)
    n = max(1, x.shape[0] * problem.O)
    C = 2 * problem.scale**2 * (np.sum(x * x) * np.sum(a["B"] ** 2) + np.sum((x @ a["A"].T) ** 2)) / n
    cap = max_change * (1 - options.momentum) / C if C > 0 else (options.lr if math.isfinite(options.lr) else 0.01)
    if options.lr <= cap:
        return options
    lr = float(f"{cap:.2g}")
    return SGDOptions(**{**options.as_kwargs(), "lr": lr, "steps": options.steps})


def observable(problem: Problem, options: SGDOptions, *, lr_fraction: float = 1.0,
               decay: float = 0.0) -> SGDOptions:
    """``options`` with lr and weight decay chosen so that every SGD option shows in every dtype.

    In bfloat16 an update below 2^-9 of a parameter rounds away, and with
    lr = 0.01 and weight decay 0.01 a decay of 1e-4 of the parameter is far
    below: a candidate ignoring weight decay, or misplacing dampening, would pass.
    Here lr = ``lr_fraction`` times the stable cap of ``stable_lr`` (so one step
    moves A and B by up to about 25 %, far above bfloat16's resolution and still
    smooth), and, when ``decay`` > 0, weight_decay = decay (1 - momentum) / lr: each
    step decays the parameters by a visible fraction ``decay`` (1 - momentum).
    """
    capped = stable_lr(problem, SGDOptions(**{**options.as_kwargs(), "lr": math.inf, "steps": options.steps}))
    lr = float(f"{lr_fraction * capped.lr:.2g}") if math.isfinite(capped.lr) else options.lr
    wd = float(f"{decay * (1 - options.momentum) / lr:.2g}") if decay > 0 and lr > 0 else 0.0
    return SGDOptions(**{**options.as_kwargs(), "lr": lr, "weight_decay": wd, "steps": options.steps})


#: (lr fraction of the stable cap, decay per step) pairs drawn by ``training_problems``
OBSERVABLE = tuple((f, dec) for f in (1.0, 0.5) for dec in (0.0, 0.25, 0.1))


def training_problems(*, dtypes: Sequence[str] = ("float32",), max_size: int = 8,
                      steps: int | None = None) -> st.SearchStrategy[tuple[Problem, SGDOptions]]:
    """(Problem, SGDOptions) pairs for training checks: no dropout, |s| <= 2, and lr and weight decay set by
    ``observable`` so that each option's effect (decay, momentum, dampening, nesterov, maximize) is above
    the dtype's resolution."""
    opts = sgd_options()
    if steps is not None:
        opts = opts.map(lambda o: SGDOptions(**{**o.as_kwargs(), "steps": int(steps)}))
    pairs = st.tuples(problems(dtypes=dtypes, dropout=False, max_size=max_size, max_scale=2.0), opts,
                      st.sampled_from(OBSERVABLE))
    return pairs.map(lambda t: (t[0], observable(t[0], t[1], lr_fraction=t[2][0], decay=t[2][1])))


def _xps():
    global _XPS
    if _XPS is None:
        _XPS = make_strategies_namespace(np)
    return _XPS


def arrays(dtype: str, shape: tuple, *, bound: float = 4.0) -> st.SearchStrategy[np.ndarray]:
    """A NumPy array of ``dtype`` with finite elements in [-bound, bound], built with
    ``hypothesis.extra.array_api`` (bfloat16: drawn as float32 and rounded once)."""
    from .tolerance import to_dtype

    base = "float32" if dtype == "bfloat16" else dtype
    elements = {"min_value": -bound, "max_value": bound, "allow_nan": False, "allow_infinity": False,
                "allow_subnormal": False}
    strat = _xps().arrays(dtype=getattr(np, base), shape=shape, elements=elements)
    return strat.map(lambda a: to_dtype(np.asarray(a), dtype)) if dtype == "bfloat16" else strat.map(np.asarray)


@st.composite
def array_problems(draw, *, dtypes: Sequence[str] = ("float32",), max_size: int = 6, max_rank: int = 4) -> dict[str, Any]:
    """{x, A, B, W, bias, dy, scale, dtype}: arrays whose values shrink themselves (towards 0)."""
    dtype = draw(globals()["dtypes"](dtypes))
    lead = draw(leads(max_dims=2, max_side=3))
    I, O, R = draw(dims(max_size=max_size)), draw(dims(max_size=max_size)), draw(ranks(max_rank=max_rank))
    out: dict[str, Any] = {"dtype": dtype, "scale": draw(scales(rank=R))}
    for name, shape in (("x", lead + (I,)), ("A", (R, I)), ("B", (O, R)), ("W", (O, I)), ("bias", (O,)),
                        ("dy", lead + (O,))):
        out[name] = draw(arrays(dtype, shape))
    return out
