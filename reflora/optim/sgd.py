"""Stochastic gradient descent with exactly ``torch.optim.SGD``'s semantics.

For each parameter p with gradient g, at step t (t = 1 is the first step):

    g_t = -g if maximize else g
    g_t = g_t + weight_decay * p                    (if weight_decay != 0)
    b_t = g_t                                       (t = 1: buffer starts AT the gradient)
    b_t = momentum * b_{t-1} + (1 - dampening) g_t  (t > 1)
    g_t = g_t + momentum * b_t  if nesterov else b_t   (if momentum != 0)
    p   = p - lr * g_t

Note the first-step buffer: torch (and reflora) start it at g_1 itself, not at
(1 - dampening) g_1; an implementation that starts the buffer at zero and
applies the dampened update from step 1 differs on every step when
dampening != 0. Each ``a + alpha * b`` above is rounded once, with alpha
rounded to the parameter's dtype, as torch's ``add(b, alpha=alpha)`` does: in
float32 the updates match torch bit for bit. Weight decay is L2 on the
parameters being optimised (A and B only; the base weight W is never touched).

The optimizer is pure (optax-style): ``init`` returns a state, ``step``
returns new parameters and a new state, and nothing passed in is written.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping, NamedTuple

import numpy as np

from ..backend import array_namespace, dtype_name

__all__ = ["SGD", "SGDState"]


class SGDState(NamedTuple):
    """Momentum buffers with the parameters' structure (None before step 1), and the step count."""

    momentum_buffer: Any
    count: int


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"SGD {name} is {value!r}; expected a finite real number")
    return float(value)


def _axpy(xp: Any, y: Any, alpha: float, x: Any) -> Any:
    """y + alpha * x as torch's ``y.add(x, alpha=alpha)``: alpha rounded to the dtype, the result rounded once.

    Note: below float64 the sum is formed in float64, where the product of two
    float32 (or float16) numbers is exact, and rounded once to the dtype; the
    plain ``y + alpha * x`` would round twice and drift from torch by an ulp.
    """
    dt = y.dtype
    if dtype_name(dt) == "float64":
        return y + alpha * x
    a = float(np.asarray(alpha, dtype=dtype_name(dt)))
    f64 = xp.float64
    return xp.astype(xp.astype(y, f64) + a * xp.astype(x, f64), dt)


def _items(tree: Any, what: str) -> tuple[list, list]:
    """(keys, values) of a dict, or of a tuple/list (keys are the positions)."""
    if isinstance(tree, Mapping):
        keys = list(tree.keys())
        return keys, [tree[k] for k in keys]
    if isinstance(tree, (tuple, list)):
        return list(range(len(tree))), list(tree)
    raise TypeError(f"{what} is {type(tree).__name__}; expected a dict, tuple or list of arrays")


def _rebuild(like: Any, values: list) -> Any:
    if isinstance(like, Mapping):
        return dict(zip(like.keys(), values))
    return tuple(values)


class SGD:
    """``torch.optim.SGD`` as a pure optimizer over a dict/tuple of arrays.

    Args:
      lr: learning rate (>= 0).
      momentum: momentum factor (>= 0).
      dampening: dampening of the gradient in the momentum buffer.
      weight_decay: L2 penalty coefficient (>= 0).
      nesterov: Nesterov momentum (needs momentum > 0 and dampening == 0).
      maximize: ascend instead of descend.

    Raises:
      ValueError: as torch raises it: negative lr, momentum or weight_decay;
        nesterov without momentum or with dampening.

    Example:
      >>> import numpy as np
      >>> opt = SGD(0.1, momentum=0.9)
      >>> params = {"A": np.ones(2)}
      >>> state = opt.init(params)
      >>> params, state = opt.step(params, {"A": np.ones(2)}, state)
      >>> params["A"].tolist()
      [0.9, 0.9]
    """

    def __init__(self, lr: float, *, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, maximize: bool = False):
        self.lr = _real("lr", lr)
        self.momentum = _real("momentum", momentum)
        self.dampening = _real("dampening", dampening)
        self.weight_decay = _real("weight_decay", weight_decay)
        if self.lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}; expected lr >= 0")
        if self.momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}; expected momentum >= 0")
        if self.weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}; expected weight_decay >= 0")
        if not isinstance(nesterov, bool) or not isinstance(maximize, bool):
            raise ValueError(f"nesterov={nesterov!r}, maximize={maximize!r}; expected booleans")
        if nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError(
                f"Nesterov momentum requires a momentum and zero dampening; got momentum={momentum}, dampening={dampening}"
            )
        self.nesterov = nesterov
        self.maximize = maximize

    def __repr__(self) -> str:
        return (f"SGD(lr={self.lr}, momentum={self.momentum}, dampening={self.dampening}, "
                f"weight_decay={self.weight_decay}, nesterov={self.nesterov}, maximize={self.maximize})")

    def init(self, params: Any) -> SGDState:
        """A fresh state for ``params`` (a dict, tuple or list of arrays)."""
        keys, _ = _items(params, "params")
        return SGDState(_rebuild(params, [None] * len(keys)), 0)

    def step(self, params: Any, grads: Any, state: SGDState) -> tuple[Any, SGDState]:
        """One update. Returns (new_params, new_state); the inputs are not modified.

        Raises:
          ValueError: grads or state do not match params (keys, shapes).
          TypeError: mixed dtypes or array libraries.
        """
        if not isinstance(state, SGDState):
            raise TypeError(f"state is {type(state).__name__}; expected the SGDState from SGD.init")
        pkeys, pvals = _items(params, "params")
        gkeys, gvals = _items(grads, "grads")
        bkeys, bufs = _items(state.momentum_buffer, "state.momentum_buffer")
        if gkeys != pkeys or bkeys != pkeys:
            raise ValueError(f"grads have keys {gkeys} and state {bkeys}; expected the params' keys {pkeys}")
        new_p, new_b = [], []
        for key, p, g, buf in zip(pkeys, pvals, gvals, bufs):
            xp = array_namespace(p, g, buf, names=(f"params[{key!r}]", f"grads[{key!r}]", "momentum buffer"))
            if tuple(g.shape) != tuple(p.shape):
                raise ValueError(f"grads[{key!r}] has shape {tuple(g.shape)}; expected {tuple(p.shape)}, the parameter's")
            if g.dtype != p.dtype or not xp.isdtype(p.dtype, "real floating"):
                raise TypeError(f"params[{key!r}] and grads[{key!r}] have dtypes {p.dtype}, {g.dtype}; expected one real floating dtype")
            if buf is not None and (tuple(buf.shape) != tuple(p.shape) or buf.dtype != p.dtype):
                raise ValueError(f"momentum buffer for {key!r} has shape {tuple(buf.shape)} and dtype {buf.dtype}; "
                                 f"expected the parameter's {tuple(p.shape)}, {p.dtype}")
            # maximize: ascend on the objective
            d_p = -g if self.maximize else g
            if self.weight_decay != 0:
                # L2 penalty: g + wd * p
                d_p = _axpy(xp, d_p, self.weight_decay, p)
            if self.momentum != 0:
                if buf is None:
                    # first step: the buffer starts at the gradient itself (a copy)
                    buf = xp.asarray(d_p, copy=True)
                else:
                    # b = momentum * b + (1 - dampening) * g
                    buf = _axpy(xp, self.momentum * buf, 1.0 - self.dampening, d_p)
                # nesterov looks ahead along the buffer
                d_p = _axpy(xp, d_p, self.momentum, buf) if self.nesterov else buf
            # p = p - lr * g
            new_p.append(_axpy(xp, p, -self.lr, d_p))
            new_b.append(buf)
        return _rebuild(params, new_p), SGDState(_rebuild(params, new_b), state.count + 1)
