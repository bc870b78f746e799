"""Input validation shared by every public function (the one private module others may import from).

Messages follow the house form "X is ...; expected ..." and use the dimension
legend N rows, I in_features, O out_features, R rank.
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from typing import Any

import numpy as np

from .backend import array_namespace, normalize_xp, resolve_dtype, to_numpy


def _shape(a: Any) -> tuple:
    return tuple(a.shape)


@functools.lru_cache(maxsize=64)
def _is_real_floating(xp: Any, dtype: Any) -> bool:
    try:
        return bool(xp.isdtype(dtype, "real floating"))
    except TypeError:  # dtypes outside the standard, e.g. ml_dtypes.bfloat16
        return False


def _check_scale(scale: Any) -> float:
    if type(scale) is float and math.isfinite(scale):
        return scale
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        # Also accept 0-d arrays (numpy scalars are numbers.Real already).
        if getattr(scale, "shape", None) == () and not isinstance(scale, (bool, np.bool_)):
            try:
                scale = float(scale)
            except (TypeError, ValueError):
                raise TypeError(f"scale is {scale!r} ({type(scale).__name__}); expected a real number") from None
        else:
            raise TypeError(f"scale is {scale!r:.80} ({type(scale).__name__}); expected a real number")
    return check_real(scale, "scale")


def _check_inputs(x, A, B, W, bias, mask):
    """Namespace, dtype and shape checks at the public boundary.

    Returns (xp, N, I, O, R). Messages use the legend letters.
    """
    names = ("x", "A", "B", "W", "bias", "dropout_mask")
    arrays = (x, A, B, W, bias, mask)
    nd = np.ndarray
    if (type(x) is nd and type(A) is nd and type(B) is nd and (W is None or type(W) is nd)
            and (bias is None or type(bias) is nd) and (mask is None or type(mask) is nd)):
        xp = np  # the common case, checked without the generic machinery
    else:
        for name, a in zip(names, arrays):
            if (a is None and name in ("x", "A", "B")) or (a is not None and not hasattr(a, "shape")):
                raise TypeError(f"{name} is {type(a).__name__}; expected an array (convert with reflora.asarray)")
            if isinstance(a, np.ma.MaskedArray):
                raise TypeError(f"{name} is a numpy.ma.MaskedArray; expected a plain array (a mask has no meaning "
                                f"in LoRA: pass {name}.filled(value) or {name}.data)")
        xp = array_namespace(*arrays, names=names)
    dt = x.dtype
    if not _is_real_floating(xp, dt):
        raise TypeError(f"x has dtype {dt}; expected a real floating dtype (float16, float32 or float64); "
                        "for bfloat16 compute in float32 (reflora.testing emulates bfloat16 rounding)")
    if A.dtype != dt or B.dtype != dt or (W is not None and W.dtype != dt) or (
            bias is not None and bias.dtype != dt) or (mask is not None and mask.dtype != dt):
        name, a = next((n, a) for n, a in zip(names[1:], arrays[1:]) if a is not None and a.dtype != dt)
        raise TypeError(f"{name} has dtype {a.dtype}; expected {dt}, the dtype of x (reflora does not promote silently)")
    if x.ndim < 1:
        raise ValueError(f"x has shape {_shape(x)}; expected (..., I) with at least one dimension")
    I = x.shape[-1]
    if A.ndim != 2 or A.shape[1] != I:
        exp = f"(R, {I})" if A.ndim == 2 else "(R, I)"
        raise ValueError(f"A has shape {_shape(A)}; expected (R, I) = {exp}, I taken from x")
    R = A.shape[0]
    if B.ndim != 2 or B.shape[1] != R:
        raise ValueError(f"B has shape {_shape(B)}; expected (O, R) = (O, {R}), R taken from A")
    O = B.shape[0]
    if W is not None and _shape(W) != (O, I):
        raise ValueError(f"W has shape {_shape(W)}; expected (O, I) = ({O}, {I}), O taken from B and I from x")
    if bias is not None and _shape(bias) != (O,):
        raise ValueError(f"bias has shape {_shape(bias)}; expected (O,) = ({O},), O taken from B")
    if mask is not None and _shape(mask) != _shape(x):
        raise ValueError(f"dropout_mask has shape {_shape(mask)}; expected x's shape {_shape(x)}")
    N = math.prod(x.shape[:-1])
    return xp, N, I, O, R


def check_real(value: Any, field: str, *, error: type = ValueError, integer: bool = False,
               minimum: float | None = None, positive: bool = False) -> Any:
    """The one rule for a number that reaches arithmetic (rank, alpha, scale, lr, a tolerance, ...).

    Accepts Python and NumPy reals (not bool); refuses NaN, +-inf and values too
    large for a float64 (a 400-digit integer), naming ``field``. ``integer`` asks
    for an int (returned as a Python int); ``minimum`` / ``positive`` bound it.
    Returns a Python float (or int). Raises ``error`` (ValueError, or
    reflora.FormatError for a value read from a file); a value that is not a
    number at all is a TypeError when ``error`` is ValueError.
    """
    wrong_type = TypeError if error is ValueError else error  # API: TypeError; a file: FormatError for all
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        kind = "an integer" if integer else "a finite real number"
        raise wrong_type(f"{field} is {value!r:.80} ({type(value).__name__}); expected {kind}")
    if integer and not isinstance(value, numbers.Integral):
        raise wrong_type(f"{field} is {value!r:.80}; expected an integer")
    try:
        as_float = float(value)
    except OverflowError:
        as_float = math.inf
    if not math.isfinite(as_float):
        big = len(repr(value)) > 40
        text = f"a {len(str(abs(int(value))))}-digit integer" if big else repr(value)
        raise error(f"{field} is {text}; expected a finite real number" + (" (beyond float64's range)" if big else ""))
    out = int(value) if integer else as_float
    if positive and not out > 0:
        raise error(f"{field} is {value!r}; expected a number > 0")
    if minimum is not None and out < minimum:
        raise error(f"{field} is {value!r}; expected a number >= {minimum:g}")
    return out


def _check_arrays(names: tuple[str, ...], arrays: tuple) -> Any:
    """TypeError for a non-array (None is allowed: an absent option); returns the arrays' namespace."""
    for name, a in zip(names, arrays):
        if a is not None and not hasattr(a, "shape"):
            raise TypeError(f"{name} is {type(a).__name__}; expected an array")
        if isinstance(a, np.ma.MaskedArray):
            raise TypeError(f"{name} is a numpy.ma.MaskedArray; expected a plain array (a mask has no meaning in "
                            f"LoRA: pass {name}.filled(value) or {name}.data)")
    return array_namespace(*arrays, names=names)


def _check_lowrank(W: Any, A: Any, B: Any, *, fan_in_fan_out: bool = False) -> tuple[int, int, int]:
    """Shapes of A (R, I), B (O, R) and W (O, I), or (I, O) with fan_in_fan_out; returns (R, I, O)."""
    if A.ndim != 2:
        raise ValueError(f"A has shape {_shape(A)}; expected (R, I)")
    R, I = A.shape
    if B.ndim != 2 or B.shape[1] != R:
        raise ValueError(f"B has shape {_shape(B)}; expected (O, R) = (O, {R}), R taken from A")
    O = B.shape[0]
    want = (I, O) if fan_in_fan_out else (O, I)
    if _shape(W) != want:
        letters = "(I, O)" if fan_in_fan_out else "(O, I)"
        raise ValueError(f"W has shape {_shape(W)}; expected {letters} = {want}, O taken from B and I from A")
    return R, I, O


def _check_vector(name: str, v: Any, O: int) -> None:
    if _shape(v) != (O,):
        raise ValueError(f"{name} has shape {_shape(v)}; expected (O,) = ({O},), O taken from B")


def _check_row_norms(xp: Any, n_O: Any) -> None:
    """DoRA's row norms n = ||W + s B A||_row: ValueError naming the rows where n is 0 or not finite."""
    if not bool(xp.all(xp.isfinite(n_O))):
        rows = np.nonzero(~np.isfinite(np.asarray(to_numpy(n_O))))[0].tolist()
        raise ValueError(
            f"DoRA row norm ||W + s B A||_o is not finite for rows o = {rows[:10]}{' ...' if len(rows) > 10 else ''} "
            f"in {n_O.dtype}; expected finite norms (W + s B A holds inf/NaN, or a norm exceeds the dtype's range)")
    if bool(xp.any(n_O == 0)):
        rows = np.nonzero(np.asarray(to_numpy(n_O)) == 0)[0].tolist()
        raise ValueError(
            f"DoRA row norm ||W + s B A||_o is 0 for rows o = {rows[:10]}{' ...' if len(rows) > 10 else ''}; "
            "expected > 0 for every row (such a row has no direction to rescale; PEFT would give inf/NaN)")


def _legacy_arguments(func: str, args: tuple, names: tuple[str, ...], given: dict[str, Any],
                      renamed: dict[str, tuple[str, Any]] | None = None, *, depth: int = 1) -> dict[str, Any]:
    """Map arguments of an old signature onto the new keyword names, with a DeprecationWarning.

    ``args`` are extra positional arguments, in the old order ``names``; ``renamed`` maps
    an old keyword spelling to (new name, the value given or None). Returns ``given``
    (new name -> value) updated; TypeError when an argument arrives twice or too many arrive.
    ``depth`` is how many reflora frames sit between the user's call and this one.
    """
    renamed = renamed or {}
    if len(args) > len(names):
        raise TypeError(f"{func}() got {len(args)} extra positional arguments; expected at most {len(names)} "
                        f"(pass {', '.join(n + '=' for n in names)} by keyword)")
    moved = dict(zip(names, args))
    for new, value in renamed.values():
        if value is not None:
            if new in moved:
                raise TypeError(f"{func}() got {new} twice; expected it once, as {new}=")
            moved[new] = value
    for name, value in moved.items():
        if given.get(name) is not None:
            raise TypeError(f"{func}() got {name} twice; expected it once, as {name}=")
        given[name] = value
    if moved:
        what = [f"{n} positionally" for n in names[:len(args)]]
        what += [f"{old}=" for old, (_, v) in renamed.items() if v is not None]
        warnings.warn(f"{func}: passing {', '.join(what)} is deprecated; pass "
                      f"{', '.join(n + '=' for n in moved)} instead", DeprecationWarning, stacklevel=2 + depth)
    return given


def _check_dy(dy: Any, x_NI: Any, x_shape: tuple, O: int) -> Any:
    """The upstream gradient of a backward: an array of x's namespace and dtype, shaped like y; returns xp."""
    if type(dy) is np.ndarray and type(x_NI) is np.ndarray:
        xp = np
    elif not hasattr(dy, "shape"):
        raise TypeError(f"dy is {type(dy).__name__}; expected an array")
    else:
        xp = array_namespace(dy, x_NI, names=("dy", "x"))
    if dy.dtype != x_NI.dtype:
        raise TypeError(f"dy has dtype {dy.dtype}; expected {x_NI.dtype}, the dtype of x")
    expected = tuple(x_shape[:-1]) + (O,)
    if _shape(dy) != expected:
        raise ValueError(f"dy has shape {_shape(dy)}; expected (..., O) = {expected}, the shape of y")
    return xp


def _float_namespace(xp: Any, dtype: Any) -> tuple[Any, Any]:
    """(namespace, dtype) for arrays a function creates: TypeError unless the dtype is real floating."""
    target = normalize_xp(xp)
    dt = resolve_dtype(target, dtype)
    if not target.isdtype(dt, "real floating"):
        raise TypeError(f"dtype is {dtype!r}; expected a real floating dtype (float16, float32 or float64)")
    return target, dt
