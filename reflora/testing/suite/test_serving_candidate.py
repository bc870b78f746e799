"""Serving conformance tests against $REFLORA_CANDIDATE (protocols in ``reflora.testing.serving``).

The candidate may also provide any of these multi-adapter callables:

    shrink(x, A, indices, *, scale) -> h
    expand(h, B, indices, *, base, offset) -> y
    multi_forward(x, A, B, indices, *, scales, W=None, bias=None) -> y
    multi_backward(x, A, B, indices, dy, *, scales, W=None, bias=None) -> (dx, dA, dB)
    sliced_forward(x, A_slices, B_slices, indices, *, scales, W=None, bias=None) -> y
    embedding(ids, E, A, B, indices, *, scales[, extra]) -> y
    embedding_backward(ids, E, A, B, indices, dy, *, scales[, extra]) -> (dA, dB)
    tp_forward(x, A, B, indices, *, scales, tp, mode, W=None, bias=None) -> [y_0, ..., y_{T-1}]

Test ids (for ``--xfails-file``): test_serving[NAME-DTYPE] for each NAME above but
tp_forward, and test_serving_tp[MODE-TP]. A missing callable is skipped.
"""

from __future__ import annotations


import pytest

import reflora.testing.serving as rts
from reflora.testing.suite.conftest import SERVING, serving_fn

DTYPES = ("float32", "float16", "bfloat16", "float64")


def _fn(candidate, name):
    """The candidate's serving callable ``name`` (skipped where it has none)."""
    fn = serving_fn(candidate, name)
    if fn is None:
        pytest.skip(f"the candidate has no {name}")
    return fn


def candidate_kwargs(candidate, options):
    return {"max_examples": options["max_examples"] or 50, "derandomize": options["derandomize"], "to": candidate.to}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", SERVING[:7])
def test_serving(candidate, options, name, dtype):
    fn = _fn(candidate, name)
    candidate.require_dtype(dtype)
    extra = {"extra_vocab": True} if name.startswith("embedding") else {}
    getattr(rts, f"check_{name}")(fn, dtype=dtype, **candidate_kwargs(candidate, options), **extra)


@pytest.mark.parametrize("tp", (1, 2, 4, 8))
@pytest.mark.parametrize("mode", ("column", "column_sharded", "row", "row_sharded"))
def test_serving_tp(candidate, options, mode, tp):
    fn = _fn(candidate, "tp_forward")
    for dtype in candidate.dtypes:
        kw = candidate_kwargs(candidate, options)
        kw["max_examples"] = min(kw["max_examples"], 10)
        rts.check_tp(fn, tp=tp, mode=mode, dtype=dtype, **kw)
