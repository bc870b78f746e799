"""Assertions and peers shared by the tests.

Tolerances are named per dtype; a failed comparison reports the max absolute
and relative difference of the named tensor and where it happened.
"""

from __future__ import annotations

import numpy as np

from reflora.backend import to_numpy

# Named tolerances (rtol, atol) per comparison kind.
F64_PEER = 1e-12        # reflora float64 vs an independent float64 peer (relative, scaled by max |ref|)
F64_FD = 1e-7           # float64 central finite differences (loss linear in each tensor -> only rounding noise)


def max_errors(actual, expected):
    """(max |a - e|, max |a - e| / max |e|, index of the max abs error)."""
    a = np.asarray(to_numpy(actual), dtype=np.float64)
    e = np.asarray(to_numpy(expected), dtype=np.float64)
    assert a.shape == e.shape, f"shape {a.shape} != expected {e.shape}"
    if a.size == 0:
        return 0.0, 0.0, ()
    diff = np.abs(a - e)
    idx = tuple(int(i) for i in np.unravel_index(int(np.argmax(diff)), diff.shape))
    scale = float(np.max(np.abs(e)))
    return float(diff[idx]), float(diff[idx]) / scale if scale > 0 else float(diff[idx]), idx


def assert_close(actual, expected, *, name: str, rel: float, atol: float = 0.0):
    """Pass when max|a - e| <= rel * max|e| + atol; report per tensor otherwise."""
    abs_err, rel_err, idx = max_errors(actual, expected)
    e = np.asarray(to_numpy(expected), dtype=np.float64)
    bound = rel * (float(np.max(np.abs(e))) if e.size else 0.0) + atol
    assert abs_err <= bound, (
        f"{name}: max abs error {abs_err:.3e} at {idx} (rel. to max|ref| {rel_err:.3e}) "
        f"exceeds {bound:.3e} (rel {rel:g}, atol {atol:g}); shape {e.shape}"
    )
