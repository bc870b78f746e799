"""LoraAdapter: a convenience holder for A, B and an optional frozen base.

All math is delegated to the pure functions in ``reflora.core`` and
``reflora.sgd``; the class only keeps state between calls.
"""

from __future__ import annotations

from typing import Any, Callable

from .backend import _normalize_xp, array_namespace, asarray, dtype_name, resolve_dtype
from .config import LoraConfig
from .core import LoraGrads, lora_backward, lora_forward, mse_loss
from .init import init_lora
from .sgd import SGD, SGDState

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
        self.xp = _normalize_xp(xp)
        self.dtype = resolve_dtype(self.xp, dtype)
        self.config = config
        self.A, self.B = init_lora(config, seed=seed, xp=self.xp, dtype=self.dtype)
        I, O = config.in_features, config.out_features
        self.W = None if W is None else self._own(W, "W", (O, I), "(O, I)")
        self.bias = None if bias is None else self._own(bias, "bias", (O,), "(O,)")
        self.merged = False
        self._cache = None
        self._sgd_state: tuple[SGD | None, SGDState | None] = (None, None)

    @classmethod
    def from_arrays(cls, A: Any, B: Any, *, alpha: float, use_rslora: bool = False, W: Any = None,
                    bias: Any = None, init: str = "kaiming_uniform") -> "LoraAdapter":
        """An adapter around existing A (R, I) and B (O, R); they keep their namespace and dtype."""
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
        return self

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
        """Trainable parameters: R (I + O). W and bias are frozen and not counted."""
        return int(self.A.shape[0] * (self.A.shape[1] + self.B.shape[0]))

    def params(self) -> dict[str, Any]:
        """The trainable parameters {"A": A, "B": B}."""
        return {"A": self.A, "B": self.B}

    def forward(self, x: Any, *, dropout_mask: Any = None) -> Any:
        """y for input x (..., I); keeps the cache for ``backward``.

        When merged, the update already sits in W and only x W^T + bias is computed.
        """
        if self.merged:
            # rank-0 slices: the same checks, no LoRA branch
            y, _ = lora_forward(x, self.A[:0, :], self.B[:, :0], scale=0.0, W=self.W, bias=self.bias)
            self._cache = None
            return y
        y, self._cache = lora_forward(x, self.A, self.B, scale=self.scale, W=self.W, bias=self.bias,
                                      dropout_mask=dropout_mask)
        return y

    __call__ = forward

    def backward(self, dy: Any) -> LoraGrads:
        """Gradients for the last ``forward`` call."""
        if self._cache is None:
            raise RuntimeError("backward() needs a forward() first (and an unmerged adapter)")
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
        new, state = sgd.step(params, {"A": grads.dA, "B": grads.dB}, state)
        self._sgd_state = (sgd, state)
        self.A, self.B = new["A"], new["B"]

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

    def delta_weight(self) -> Any:
        """The dense update s B A, (O, I). Forms the O x I product: for merging only."""
        return self.scale * self.xp.matmul(self.B, self.A)

    def merge(self) -> None:
        """W <- RN(W + s B A), correctly rounded to W's dtype (``reflora.merge``)."""
        from .merge import merge  # noqa: PLC0415 - reflora.merge imports nothing of the adapter's

        if self.W is None:
            raise ValueError("merge() needs a base weight W; this adapter has none")
        if self.merged:
            raise RuntimeError("the adapter is already merged")
        self.W = merge(self.W, self.A, self.B, scale=self.scale).weight
        self.merged = True

    def unmerge(self) -> None:
        """W <- RN(W - s B A) (``reflora.unmerge``). In float16 not an identity: see reflora.merge."""
        from .merge import unmerge  # noqa: PLC0415

        if not self.merged:
            raise RuntimeError("the adapter is not merged")
        self.W = unmerge(self.W, self.A, self.B, scale=self.scale).weight
        self.merged = False

    def to(self, xp: Any) -> "LoraAdapter":
        """Move every array to another namespace ("numpy", "cupy", a module); returns self."""
        target = _normalize_xp(xp)
        self.dtype = resolve_dtype(target, dtype_name(self.dtype))
        for name in ("A", "B", "W", "bias"):
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
