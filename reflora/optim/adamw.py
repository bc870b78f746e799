"""Adam and AdamW with exactly ``torch.optim.Adam`` / ``torch.optim.AdamW``'s semantics.

For a parameter p with gradient g at step t = 1, 2, ... (lr, betas (b1, b2),
eps, weight decay wd):

    g   = -g if maximize else g
    p   = p (1 - lr wd)                      AdamW: decoupled decay, before the moments
    g   = g + wd p                           Adam:  L2 decay, folded into the gradient
    m   = m + (1 - b1) (g - m)               first moment (torch's lerp; m_0 = 0)
    v   = b2 v + (1 - b2) g g                second moment (v_0 = 0)
    vmax = max(vmax, v)                      amsgrad only: the running max of v (raw, not corrected;
                                             optax's scale_by_amsgrad maxes the corrected v instead)
    bc1 = 1 - b1^t,  bc2 = 1 - b2^t          bias corrections, t counted from 1
    p   = p - (lr / bc1) m / (sqrt(v or vmax) / sqrt(bc2) + eps)

eps is added *outside* the square root and *after* the second bias
correction (it is not corrected); t is the number of steps taken including
this one. Weight decay applies only to the parameters being optimised.

Rounding. Every line above is computed as torch's single-tensor path
(``foreach=False``) computes it on the CPU, each op rounded once where torch
rounds it (``reflora.optim._arith``): in float32 the results match torch bit
for bit, except where torch's CPU ``sqrt`` (MKL's vsSqrt, not correctly
rounded) misses the nearest float32, in about 0.6% of random inputs;
reflora's sqrt is correctly rounded. float16 is computed as each op in
float32, rounded to float16; torch's Half kernels differ in details (add's
scalar is rounded to float16, lerp and addcmul keep intermediates in
float32), so float16 results differ from torch's in 6-8% of the elements,
by at most 8 float16 ulps of max(|p|, lr) (measured, 5 steps). The derivation of each rounding,
and where torch's foreach and fused paths round differently, is on the
documentation page "AdamW" (docs/derivations/adamw.md).

Parameter groups: ``groups`` lists ``{"params": [keys], "lr": ..., "weight_decay": ...}``
dictionaries (torch's param groups, by parameter key); parameters in no group
use the optimiser's own lr and weight decay. ``reflora.optim.loraplus_groups``
builds PEFT's LoRA+ groups.

The optimiser is pure (optax-style): ``init`` returns a state, ``step``
returns new parameters and a new state, and nothing passed in is written.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping, NamedTuple, Sequence

from .._validate import _is_real_floating
from ..backend import array_namespace
from ._tree import items as _items, rebuild as _rebuild
from ._arith import Arith

__all__ = ["Adam", "AdamState", "AdamW"]


class AdamState(NamedTuple):
    """First and second moments (and amsgrad's running max; None entries without amsgrad) and the step count.

    Each of ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq`` has the parameters' structure
    (None entries before step 1); ``count`` is the number of steps taken (torch's ``state["step"]``).
    """

    exp_avg: Any
    exp_avg_sq: Any
    max_exp_avg_sq: Any
    count: int


def _number(cls: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{cls} {name} is {value!r} ({type(value).__name__}); expected a finite real number")
    if not math.isfinite(value):
        raise ValueError(f"{cls} {name} is {value!r}; expected a finite real number")
    return float(value)


def _hyper(cls: str, lr: Any, betas: Any, eps: Any, weight_decay: Any, where: str = "") -> tuple:
    """Validated (lr, (b1, b2), eps, wd): torch's refusals, in reflora's words."""
    lr = _number(cls, f"{where}lr", lr)
    if lr < 0.0:
        raise ValueError(f"{cls} {where}lr is {lr!r}; expected lr >= 0 (torch: Invalid learning rate)")
    eps = _number(cls, f"{where}eps", eps)
    if eps < 0.0:
        raise ValueError(f"{cls} {where}eps is {eps!r}; expected eps >= 0 (torch: Invalid epsilon value)")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{cls} {where}betas is {betas!r}; expected a pair (beta1, beta2)")
    b = tuple(_number(cls, f"{where}betas[{i}]", v) for i, v in enumerate(betas))
    for i, v in enumerate(b):
        if not 0.0 <= v < 1.0:
            raise ValueError(f"{cls} {where}betas[{i}] is {v!r}; expected 0 <= beta < 1 "
                             f"(torch: Invalid beta parameter at index {i})")
    wd = _number(cls, f"{where}weight_decay", weight_decay)
    if wd < 0.0:
        raise ValueError(f"{cls} {where}weight_decay is {wd!r}; expected weight_decay >= 0 "
                         f"(torch: Invalid weight_decay value)")
    return lr, b, eps, wd


class Adam:
    """``torch.optim.Adam`` as a pure optimiser over a dict/tuple of arrays (L2 weight decay).

    Args:
      lr: learning rate (>= 0).
      betas: (beta1, beta2), each in [0, 1).
      eps: added to the denominator outside the square root (>= 0).
      weight_decay: L2 coefficient (>= 0), folded into the gradient (Adam) or
        applied as p (1 - lr wd) (AdamW).
      amsgrad: normalise by the running maximum of the second moment.
      maximize: ascend instead of descend.
      groups: optional torch-style parameter groups by key:
        ``[{"params": ["B"], "lr": 1e-3, "weight_decay": 0.0}, ...]``.

    Raises:
      ValueError: as torch raises it (negative lr, eps or weight_decay; a beta
        outside [0, 1)), and for non-finite numbers, a betas that is not a pair,
        a parameter in two groups or a group key other than params/lr/weight_decay.
      TypeError: a hyper-parameter that is not a real number, a flag that is not a
        bool, groups that are not a list of dicts with a list of keys.

    Example:
      >>> import numpy as np
      >>> opt = Adam(0.1)
      >>> params = {"A": np.array([1.0, -2.0])}
      >>> state = opt.init(params)
      >>> params, state = opt.step(params, {"A": np.array([0.5, -3.0])}, state)
      >>> params["A"].round(6).tolist()   # the first step moves each element by lr (sign of g)
      [0.9, -1.9]
    """

    _decoupled = False
    _name = "Adam"

    def __init__(self, lr: float, *, betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False, maximize: bool = False,
                 groups: Sequence[Mapping[str, Any]] | None = None):
        self.lr, self.betas, self.eps, self.weight_decay = _hyper(self._name, lr, betas, eps, weight_decay)
        for name, flag in (("amsgrad", amsgrad), ("maximize", maximize)):
            if not isinstance(flag, bool):
                raise TypeError(f"{self._name} {name} is {flag!r}; expected True or False")
        self.amsgrad, self.maximize = amsgrad, maximize
        self.groups = self._groups(groups)

    def _groups(self, groups: Any) -> tuple[dict, ...]:
        if groups is None:
            return ()
        if isinstance(groups, Mapping) or not isinstance(groups, (tuple, list)):
            raise TypeError(f"{self._name} groups is {type(groups).__name__}; expected a list of "
                             f"{{'params': [keys], 'lr': ..., 'weight_decay': ...}} dicts")
        out, seen = [], set()
        for i, g in enumerate(groups):
            if not isinstance(g, Mapping) or "params" not in g:
                raise TypeError(f"{self._name} groups[{i}] is {g!r}; expected a dict with a 'params' list of keys")
            if not isinstance(g["params"], (tuple, list)):
                # a string would be read as its characters: {"params": "AB"} as ["A", "B"]
                raise TypeError(f"{self._name} groups[{i}]['params'] is {g['params']!r}; expected a list of "
                                f"parameter keys")
            extra = set(g) - {"params", "lr", "weight_decay"}
            if extra:
                raise ValueError(f"{self._name} groups[{i}] has keys {sorted(extra)}; expected only 'params', "
                                 f"'lr' and 'weight_decay'")
            keys = list(g["params"])
            dup = seen.intersection(keys)
            if dup or len(set(keys)) != len(keys):
                raise ValueError(f"{self._name} groups[{i}] lists {sorted(dup or keys, key=repr)} again; expected "
                                 f"each parameter in at most one group (torch refuses it too)")
            seen.update(keys)
            lr, _, _, wd = _hyper(self._name, g.get("lr", self.lr), self.betas, self.eps,
                                  g.get("weight_decay", self.weight_decay), where=f"groups[{i}] ")
            out.append({"params": keys, "lr": lr, "weight_decay": wd})
        return tuple(out)

    def _options(self, key: Any) -> tuple[float, float]:
        """(lr, weight_decay) of the group holding ``key``, or the defaults."""
        for g in self.groups:
            if key in g["params"]:
                return g["lr"], g["weight_decay"]
        return self.lr, self.weight_decay

    def __repr__(self) -> str:
        g = f", groups={list(self.groups)}" if self.groups else ""
        return (f"{self._name}(lr={self.lr}, betas={self.betas}, eps={self.eps}, weight_decay={self.weight_decay}, "
                f"amsgrad={self.amsgrad}, maximize={self.maximize}{g})")

    def init(self, params: Any) -> AdamState:
        """A fresh state for ``params`` (a dict, tuple or list of arrays)."""
        keys, _ = _items(params, "params")
        for g in self.groups:
            unknown = [k for k in g["params"] if k not in keys]
            if unknown:
                raise ValueError(f"{self._name} groups name parameters {unknown}; expected keys of params {keys}")
        none = _rebuild(params, [None] * len(keys))
        return AdamState(none, none, none, 0)

    def step(self, params: Any, grads: Any, state: AdamState) -> tuple[Any, AdamState]:
        """One update. Returns (new_params, new_state); the inputs are not modified.

        Raises:
          ValueError: grads or state do not match params (keys, shapes).
          TypeError: mixed dtypes or array libraries, or a state from another optimiser.
        """
        if not isinstance(state, AdamState):
            raise TypeError(f"state is {type(state).__name__}; expected the AdamState from {self._name}.init")
        if isinstance(state.count, bool) or not isinstance(state.count, int):
            raise TypeError(f"state.count is {state.count!r}; expected the number of steps taken, an int >= 0")
        if state.count < 0:
            # a count of -1 with moments present made t = 0: 1 - b1^0 = 0, a ZeroDivisionError
            raise ValueError(f"state.count is {state.count!r}; expected the number of steps taken, an int >= 0")
        pkeys, pvals = _items(params, "params")
        gkeys, gvals = _items(grads, "grads")
        mkeys, ms = _items(state.exp_avg, "state.exp_avg")
        _, vs = _items(state.exp_avg_sq, "state.exp_avg_sq")
        _, vmaxs = _items(state.max_exp_avg_sq, "state.max_exp_avg_sq")
        if gkeys != pkeys or mkeys != pkeys or len(vs) != len(pkeys) or len(vmaxs) != len(pkeys):
            raise ValueError(f"grads have keys {gkeys} and state {mkeys}; expected the params' keys {pkeys}")
        t = state.count + 1
        b1, b2 = self.betas
        new_p, new_m, new_v, new_vmax = [], [], [], []
        for key, p, g, m, v, vmax in zip(pkeys, pvals, gvals, ms, vs, vmaxs):
            xp = array_namespace(p, g, m, v, vmax, names=(f"params[{key!r}]", f"grads[{key!r}]", "exp_avg",
                                                          "exp_avg_sq", "max_exp_avg_sq"))
            if tuple(g.shape) != tuple(p.shape):
                raise ValueError(f"grads[{key!r}] has shape {tuple(g.shape)}; expected {tuple(p.shape)}, "
                                 f"the parameter's")
            if g.dtype != p.dtype or not _is_real_floating(xp, p.dtype):
                raise TypeError(f"params[{key!r}] and grads[{key!r}] have dtypes {p.dtype}, {g.dtype}; "
                                f"expected one real floating dtype (float16, float32 or float64; bfloat16 is not "
                                f"an array-API dtype: use float32)")
            for what, s in (("exp_avg", m), ("exp_avg_sq", v), ("max_exp_avg_sq", vmax)):
                if s is not None and (tuple(s.shape) != tuple(p.shape) or s.dtype != p.dtype):
                    raise ValueError(f"state.{what} for {key!r} has shape {tuple(s.shape)} and dtype {s.dtype}; "
                                     f"expected the parameter's {tuple(p.shape)}, {p.dtype}")
            if (m is None) != (v is None) or (m is None) != (state.count == 0):
                raise ValueError(f"state for {key!r} has exp_avg {'absent' if m is None else 'present'} and count "
                                 f"{state.count}; expected moments exactly after the first step")
            if self.amsgrad and (vmax is None) != (m is None):
                raise ValueError(f"state.max_exp_avg_sq for {key!r} is missing; expected it with amsgrad=True")
            lr, wd = self._options(key)
            r = Arith(xp, p.dtype)
            zero = xp.zeros_like(p)
            m = zero if m is None else m
            v = zero if v is None else v
            # maximize: ascend on the objective
            g = -g if self.maximize else g
            if wd != 0:
                if self._decoupled:
                    # AdamW: p (1 - lr wd), the factor rounded to the opmath dtype (torch's param.mul_)
                    p = r.mul(p, r.scalar(1.0 - lr * wd))
                else:
                    # Adam: L2, g + wd p, one fused rounding (torch's grad.add(param, alpha=wd))
                    g = r.fma(r.scalar(wd), p, g)
            # m <- lerp(m, g, 1 - b1): torch's kernel forms m + w (g - m) for w < 0.5, else g + (w - 1) (g - m)
            w = r.scalar(1.0 - b1)
            d = r.sub(g, m)
            m = r.fma(w, d, m) if abs(w) < 0.5 else r.fma(r.scalar(w - 1.0), d, g)
            # v <- b2 v + (1 - b2) g g: mul_, then addcmul_ fused as fma((1 - b2) g, g, v)
            v = r.fma(r.mul(g, r.scalar(1.0 - b2)), g, r.mul(v, r.scalar(b2)))
            # bias corrections, in Python floats (float64) as torch forms them
            bc1 = 1.0 - b1 ** float(t)
            bc2_sqrt = (1.0 - b2 ** float(t)) ** 0.5
            step_size = lr / bc1
            if self.amsgrad:
                # the running max of the raw second moment (before its bias correction)
                vmax = v if vmax is None else xp.maximum(vmax, v)
                src = vmax
            else:
                src = v
            # denom = sqrt(v) / sqrt(bc2) + eps: eps outside the root, after (and not under) the correction
            denom = r.add(r.div(r.sqrt(src), r.scalar(bc2_sqrt)), r.scalar(self.eps))
            # p <- p + (-step_size) m / denom: torch's addcdiv_, rounded after the product, the quotient, the sum
            p = r.add(p, r.div(r.mul(m, r.scalar(-step_size)), denom))
            new_p.append(p)
            new_m.append(m)
            new_v.append(v)
            new_vmax.append(vmax if self.amsgrad else None)
        return _rebuild(params, new_p), AdamState(_rebuild(params, new_m), _rebuild(params, new_v),
                                                  _rebuild(params, new_vmax), t)


class AdamW(Adam):
    """``torch.optim.AdamW``: Adam with decoupled weight decay p <- p (1 - lr wd), default wd 1e-2.

    Arguments, errors and state as ``Adam``.

    Example:
      >>> import numpy as np
      >>> opt = AdamW(0.1, weight_decay=0.5)
      >>> params = {"A": np.array([2.0])}
      >>> params, _ = opt.step(params, {"A": np.array([0.0])}, opt.init(params))
      >>> params["A"].tolist()   # a zero gradient: decay alone, 2 (1 - 0.1 * 0.5)
      [1.9]
    """

    _decoupled = True
    _name = "AdamW"

    def __init__(self, lr: float, *, betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, maximize: bool = False,
                 groups: Sequence[Mapping[str, Any]] | None = None):
        super().__init__(lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                         groups=groups)
