"""LoraAdapter: a convenience holder for A, B and an optional frozen base.

All math is delegated to the pure functions in ``reflora.ops.lora`` and
``reflora.optim.sgd``; the class only keeps state between calls.
"""

from __future__ import annotations

from typing import Any, Callable

from .backend import array_namespace, asarray, dtype_name, normalize_xp, resolve_dtype
from .config import LoraConfig
from .ops.dora import DoraCache, dora_backward, dora_forward, dora_merge, dora_unmerge
from .ops.init import init_lora
from .ops.lora import LoraGrads, lora_backward, lora_forward, mse_loss
from .ops.lora_bias import LoraBiasCache, lora_bias_backward, lora_bias_forward
from .optim.sgd import SGD, SGDState

__all__ = ["LoraAdapter"]


class LoraAdapter:
    """One LoRA-adapted linear layer: y = x W^T + bias + s (x A^T) B^T.

    Args:
      config: a ``LoraConfig`` (rank, alpha, in/out features, scaling, init).
      seed: seed of the host generator that draws A (see ``init_lora``).
      xp: namespace to create arrays in (module or "numpy"/"cupy"/"auto");
        None = the default backend (``$REFLORA_BACKEND``).
      dtype: floating dtype of A, B (and of W and bias, which are converted
        with ``reflora.asarray`` if given in another library or dtype).
      W: optional frozen base weight (O, I).
      bias: optional frozen base bias (O,).

    Attributes:
      A: (R, I) down-projection.
      B: (O, R) up-projection.
      W: the frozen base weight (O, I), or None.
      bias: the frozen base bias (O,), or None.
      config: the ``LoraConfig``.
      merged: True while the update sits in W (after ``merge()``).

    Example:
      >>> ad = LoraAdapter(LoraConfig(rank=2, in_features=4, out_features=3), xp="numpy")
      >>> ad.num_params()
      14
    """

    def __init__(self, config: LoraConfig, *, seed: int = 0, xp: Any = None, dtype: Any = "float32",
                 W: Any = None, bias: Any = None):
        if not isinstance(config, LoraConfig):
            raise TypeError(f"config is {type(config).__name__}; expected reflora.LoraConfig")
        self.xp = normalize_xp(xp)
        self.dtype = resolve_dtype(self.xp, dtype)
        self.config = config
        self.A, self.B = init_lora(config, seed=seed, xp=self.xp, dtype=self.dtype)
        I, O = config.in_features, config.out_features
        self.W = None if W is None else self._own(W, "W", (O, I), "(O, I)")
        self.bias = None if bias is None else self._own(bias, "bias", (O,), "(O,)")
        self.merged = False
        self._cache = None
        self._sgd_state: tuple[SGD | None, SGDState | None] = (None, None)
        # optional PEFT extras (reflora.ops.dora, reflora.ops.lora_bias); None = plain LoRA
        self.magnitude, self.lora_bias, self.dora_norm_grad, self._dora_norm = None, None, "detached", None

    @classmethod
    def from_arrays(cls, A: Any, B: Any, *, alpha: float, use_rslora: bool = False, W: Any = None,
                    bias: Any = None, init: str = "kaiming_uniform", magnitude: Any = None,
                    lora_bias: Any = None) -> "LoraAdapter":
        """An adapter around existing A (R, I) and B (O, R); they keep their namespace and dtype.

        ``magnitude`` (O,) makes it a DoRA layer (``reflora.ops.dora``; needs W to run) and
        ``lora_bias`` (O,) adds PEFT's bias on lora_B (``reflora.ops.lora_bias``).
        """
        xp = array_namespace(A, B, names=("A", "B"))
        if A.ndim != 2 or B.ndim != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(f"A has shape {tuple(A.shape)} and B {tuple(B.shape)}; expected (R, I) and (O, R)")
        if A.dtype != B.dtype:
            raise TypeError(f"A has dtype {A.dtype} and B {B.dtype}; expected one dtype")
        R, I = A.shape
        config = LoraConfig(rank=R, alpha=alpha, in_features=I, out_features=B.shape[0],
                            use_rslora=use_rslora, init=init)
        self = cls.__new__(cls)
        self.xp, self.dtype, self.config = xp, A.dtype, config
        self.A, self.B = A, B
        self.W = None if W is None else self._own(W, "W", (B.shape[0], I), "(O, I)")
        self.bias = None if bias is None else self._own(bias, "bias", (B.shape[0],), "(O,)")
        self.merged, self._cache, self._sgd_state = False, None, (None, None)
        self.dora_norm_grad, self._dora_norm = "detached", None
        self.magnitude = None if magnitude is None else self._extra(magnitude, "magnitude")
        self.lora_bias = None if lora_bias is None else self._extra(lora_bias, "lora_bias")
        return self

    def _extra(self, a: Any, name: str) -> Any:
        O = self.B.shape[0]
        array_namespace(self.A, a, names=("A", name))
        if tuple(a.shape) != (O,):
            raise ValueError(f"{name} has shape {tuple(a.shape)}; expected (O,) = ({O},), O taken from B")
        if a.dtype != self.A.dtype:
            raise TypeError(f"{name} has dtype {a.dtype}; expected {self.A.dtype}, the dtype of A")
        return a

    def _own(self, a: Any, name: str, shape: tuple, letters: str) -> Any:
        a = asarray(a, xp=self.xp, dtype=self.dtype)
        if tuple(a.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(a.shape)}; expected {letters} = {shape} from the config")
        return a

    @property
    def scale(self) -> float:
        """alpha / R, or alpha / sqrt(R) with rsLoRA."""
        return self.config.scale

    def num_params(self) -> int:
        """Trainable parameters: R (I + O), plus O each for a DoRA magnitude and a lora_bias."""
        extra = sum(int(self.B.shape[0]) for a in (self.magnitude, self.lora_bias) if a is not None)
        return int(self.A.shape[0] * (self.A.shape[1] + self.B.shape[0])) + extra

    def params(self) -> dict[str, Any]:
        """The trainable parameters {"A": A, "B": B} (and "m", "lora_bias" when present)."""
        out = {"A": self.A, "B": self.B}
        if self.magnitude is not None:
            out["m"] = self.magnitude
        if self.lora_bias is not None:
            out["lora_bias"] = self.lora_bias
        return out

    def forward(self, x: Any, *, dropout_mask: Any = None) -> Any:
        """y for input x (..., I); keeps the cache for ``backward``.

        When merged, the update already sits in W and only x W^T + bias is computed.
        """
        if self.merged:
            # rank-0 slices: the same checks, no LoRA branch
            y, _ = lora_forward(x, self.A[:0, :], self.B[:, :0], scale=0.0, W=self.W, bias=self.bias)
            self._cache = None
            return y
        if self.magnitude is not None:
            if self.lora_bias is not None:
                raise ValueError("DoRA with lora_bias is not supported (PEFT's merge of the pair disagrees with "
                                 "its own forward)")
            y, self._cache = dora_forward(x, self.A, self.B, self.magnitude, self.W, scale=self.scale,
                                          bias=self.bias, dropout_mask=dropout_mask, norm_grad=self.dora_norm_grad)
        elif self.lora_bias is not None:
            y, self._cache = lora_bias_forward(x, self.A, self.B, self.lora_bias, scale=self.scale, W=self.W,
                                               bias=self.bias, dropout_mask=dropout_mask)
        else:
            y, self._cache = lora_forward(x, self.A, self.B, scale=self.scale, W=self.W, bias=self.bias,
                                          dropout_mask=dropout_mask)
        return y

    __call__ = forward

    def backward(self, dy: Any) -> LoraGrads:
        """Gradients for the last ``forward`` call."""
        if self._cache is None:
            raise RuntimeError("backward() needs a forward() first (and an unmerged adapter)")
        if isinstance(self._cache, DoraCache):
            return dora_backward(dy, self._cache)  # DoraGrads(dx, dA, dB, dm)
        if isinstance(self._cache, LoraBiasCache):
            return lora_bias_backward(dy, self._cache)  # LoraBiasGrads(dx, dA, dB, dlora_bias)
        return lora_backward(dy, self._cache)

    def step(self, grads: LoraGrads, sgd: SGD) -> None:
        """Update A and B in place of the attributes (new arrays; W stays frozen).

        The optimizer state is kept per ``sgd`` object, so momentum carries
        over between calls with the same optimizer.
        """
        if self.merged:
            raise RuntimeError("the adapter is merged; unmerge() before training")
        if not isinstance(sgd, SGD):
            raise TypeError(f"sgd is {type(sgd).__name__}; expected reflora.SGD")
        params = self.params()
        owner, state = self._sgd_state
        if owner is not sgd:
            state = sgd.init(params)
        g = {"A": grads.dA, "B": grads.dB}
        if "m" in params:
            g["m"] = grads.dm
        if "lora_bias" in params:
            g["lora_bias"] = grads.dlora_bias
        new, state = sgd.step(params, g, state)
        self._sgd_state = (sgd, state)
        self.A, self.B = new["A"], new["B"]
        if "m" in new:
            self.magnitude = new["m"]
        if "lora_bias" in new:
            self.lora_bias = new["lora_bias"]

    def fit(self, x: Any, target: Any, *, steps: int, sgd: SGD,
            callback: Callable[[int, float], Any] | None = None) -> list[float]:
        """Full-batch MSE training of A and B for ``steps`` SGD steps.

        Args:
          x: (..., I) inputs; target: (..., O) desired outputs.
          steps: number of SGD steps (>= 0).
          sgd: the optimizer.
          callback: called as callback(step, loss) after each step's forward
            (step counts from 0); return value ignored.

        Returns:
          The loss before each step, as Python floats.
        """
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps is {steps!r}; expected an int >= 0")
        losses = []
        for i in range(steps):
            y = self.forward(x)
            loss, dy = mse_loss(y, target)
            losses.append(float(loss))
            if callback is not None:
                callback(i, losses[-1])
            self.step(self.backward(dy), sgd)
        return losses

    def merge(self) -> None:
        """W <- RN(W + s B A), correctly rounded to W's dtype (``reflora.merge``)."""
        from .numerics.merge import merge  # noqa: PLC0415 - reflora.numerics.merge imports nothing of the adapter's

        if self.W is None:
            raise ValueError("merge() needs a base weight W; this adapter has none")
        if self.merged:
            raise RuntimeError("the adapter is already merged")
        if self.magnitude is not None:
            # W <- RN((m / n) (W + s B A)); n is kept for unmerge (W' alone does not determine it)
            res = dora_merge(self.W, self.A, self.B, self.magnitude, scale=self.scale)
            self.W, self._dora_norm = res.weight, res.norm
        else:
            self.W, self.bias = merge(self.W, self.A, self.B, scale=self.scale, bias=self.bias,
                                      lora_bias=self.lora_bias)
        self.merged = True

    def unmerge(self) -> None:
        """W <- RN(W - s B A) (``reflora.unmerge``). In float16 not an identity: see reflora.numerics.merge."""
        from .numerics.merge import unmerge  # noqa: PLC0415

        if not self.merged:
            raise RuntimeError("the adapter is not merged")
        if self.magnitude is not None:
            self.W = dora_unmerge(self.W, self.A, self.B, self.magnitude, scale=self.scale, norm=self._dora_norm)
        else:
            self.W, self.bias = unmerge(self.W, self.A, self.B, scale=self.scale, bias=self.bias,
                                        lora_bias=self.lora_bias)
        self.merged = False

    def to(self, xp: Any) -> "LoraAdapter":
        """Move every array to another namespace ("numpy", "cupy", a module); returns self."""
        target = normalize_xp(xp)
        self.dtype = resolve_dtype(target, dtype_name(self.dtype))
        for name in ("A", "B", "W", "bias", "magnitude", "lora_bias"):
            a = getattr(self, name)
            if a is not None:
                setattr(self, name, asarray(a, xp=target))
        self.xp, self._cache, self._sgd_state = target, None, (None, None)
        return self

    def __repr__(self) -> str:
        c = self.config
        return (f"LoraAdapter(rank={c.rank}, alpha={c.alpha}, in={c.in_features}, out={c.out_features}, "
                f"scale={self.scale:g}, dtype={dtype_name(self.dtype)}, xp={self.xp.__name__}, "
                f"base={'yes' if self.W is not None else 'no'}, merged={self.merged})")
