"""Serving problems: seeded multi-adapter cases the serving checks and golden files are made of.

A ``ServingProblem`` is a handful of numbers (shapes, per-adapter ranks and
scales, per-row adapter indices, dtype, seed); ``arrays()`` turns it into the
inputs, every one already representable in the problem's dtype and held as
float64 NumPy (bfloat16 through ml_dtypes). Legend: N rows, I in, O out,
L adapters, R = max rank (ranks below R padded with zeros), V vocabulary,
X extra tokens per adapter, D = O the embedding dim.

Values: "uniform" draws |v| in [1/8, 2] with a random sign, so no product of
two entries is subnormal in float32 or bfloat16 and cancellation is mild;
"int" draws integers in [-3, 3], for which small problems with power-of-two
scales are exact in every dtype (tolerance 0).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_dtypes
import numpy as np

__all__ = ["SERVING_DTYPES", "ServingProblem", "host_dtype", "round_to"]

SERVING_DTYPES = ("float64", "float32", "float16", "bfloat16")
_BF16 = np.dtype(ml_dtypes.bfloat16)


def host_dtype(dtype: str) -> np.dtype:
    """The NumPy dtype for a serving dtype name (bfloat16 from ml_dtypes)."""
    if dtype not in SERVING_DTYPES:
        raise TypeError(f"dtype {dtype!r}; expected one of {SERVING_DTYPES}")
    return _BF16 if dtype == "bfloat16" else np.dtype(dtype)


def round_to(a: np.ndarray, dtype: str) -> np.ndarray:
    """Round float64 values to ``dtype`` (via float32 for bfloat16) and return them as float64."""
    if dtype == "float64":
        return np.asarray(a, dtype=np.float64)
    if dtype == "bfloat16":
        return np.asarray(a, dtype=np.float32).astype(_BF16).astype(np.float64)
    return np.asarray(a, dtype=np.float64).astype(dtype).astype(np.float64)


@dataclasses.dataclass(frozen=True)
class ServingProblem:
    """One multi-adapter problem.

    Attributes:
      I, O: in and out features (for embeddings: V = I tokens, D = O).
      ranks: rank of each adapter (L = len(ranks)); R = max(ranks), 0 allowed.
      indices: adapter of each row (N = len(indices)), -1 for none.
      scales: scale of each adapter (L values).
      dtype: the candidate's dtype. seed: the arrays' seed.
      W, bias: whether the base weight / bias exist.
      values: "uniform" or "int".
      offset, tail: expand: the slice sits in columns [offset, offset + O) of a
        base of width offset + O + tail.
      X: embedding extra tokens per adapter (0: none).
      slices: output slice widths summing to O (fused qkv, gate_up); () means one slice.
    """

    I: int
    O: int
    ranks: tuple
    indices: tuple
    scales: tuple
    dtype: str = "float32"
    seed: int = 0
    W: bool = True
    bias: bool = False
    values: str = "uniform"
    offset: int = 0
    tail: int = 0
    X: int = 0
    slices: tuple = ()

    def __post_init__(self):
        L = len(self.ranks)
        if len(self.scales) != L:
            raise ValueError(f"{len(self.scales)} scales for {L} adapters; expected one per adapter")
        if any(i < -1 or i >= L for i in self.indices):
            raise ValueError(f"indices {self.indices}; expected each in [-1, L) = [-1, {L})")
        if self.slices and (sum(self.slices) != self.O or min(self.slices) < 1):
            raise ValueError(f"slices {self.slices}; expected positive widths summing to O = {self.O}")
        if self.values not in ("uniform", "int"):
            raise ValueError(f"values is {self.values!r}; expected 'uniform' or 'int'")
        host_dtype(self.dtype)

    @property
    def N(self) -> int:
        return len(self.indices)

    @property
    def L(self) -> int:
        return len(self.ranks)

    @property
    def R(self) -> int:
        return max(self.ranks, default=0)

    def _draw(self, rng: np.random.Generator, shape: tuple) -> np.ndarray:
        if self.values == "int":
            a = rng.integers(-3, 4, size=shape).astype(np.float64)
        else:
            a = rng.uniform(0.125, 2.0, size=shape) * rng.choice([-1.0, 1.0], size=shape)
        return round_to(a, self.dtype)

    def arrays(self) -> dict[str, Any]:
        """All inputs, float64 holding values of ``dtype``; integer arrays as int64.

        Keys: x (N, I), A (L, R, I), B (L, O, R), W (O, I) or None, bias (O,) or None,
        dy (N, O), h (N, R), base (N, offset + O + tail), indices (N,),
        ids (N,) tokens in [0, I + X) (added tokens only in rows with an adapter),
        E (I, O), embA (L, R, I + X), embB (L, O, R), extra (L, X, O) or None,
        A_slices / B_slices: lists of (L, R, I) / (L, O_k, R), one per entry of ``slices``.
        """
        rng = np.random.default_rng(self.seed)
        N, I, O, L, R = self.N, self.I, self.O, self.L, self.R
        A = self._draw(rng, (L, R, I))
        B = self._draw(rng, (L, O, R))
        for lv, r in enumerate(self.ranks):
            # zero padding past each adapter's own rank
            A[lv, r:, :] = 0.0
            B[lv, :, r:] = 0.0
        out = {
            "x": self._draw(rng, (N, I)), "A": A, "B": B,
            "W": self._draw(rng, (O, I)) if self.W else None,
            "bias": self._draw(rng, (O,)) if self.bias else None,
            "dy": self._draw(rng, (N, O)), "h": self._draw(rng, (N, R)),
            "base": self._draw(rng, (N, self.offset + O + self.tail)),
            "indices": np.asarray(self.indices, dtype=np.int64),
        }
        X = self.X
        ids = rng.integers(0, I, size=N)
        if X:
            added = rng.integers(I, I + X, size=N)
            use = (rng.random(N) < 0.5) & (out["indices"] >= 0)
            ids = np.where(use, added, ids)
        embA = self._draw(rng, (L, R, I + X))
        embB = self._draw(rng, (L, O, R))
        for lv, r in enumerate(self.ranks):
            embA[lv, r:, :] = 0.0
            embB[lv, :, r:] = 0.0
        out.update(ids=ids.astype(np.int64), E=self._draw(rng, (I, O)), embA=embA, embB=embB,
                   extra=self._draw(rng, (L, X, O)) if X else None)
        # fused slices: slice 0 uses A and the first columns of B; the others their own stacks
        A_s, B_s, off = [], [], 0
        for k, w in enumerate(self.slices):
            Ak = A if k == 0 else self._draw(rng, (L, R, I))
            Bk = self._draw(rng, (L, w, R))
            for lv, r in enumerate(self.ranks):
                Ak[lv, r:, :] = 0.0
                Bk[lv, :, r:] = 0.0
            A_s.append(Ak)
            B_s.append(Bk)
            off += w
        out.update(A_slices=A_s, B_slices=B_s)
        return out

    def __repr__(self) -> str:
        f = ", ".join(f"{k.name}={getattr(self, k.name)!r}" for k in dataclasses.fields(self))
        return f"ServingProblem({f})"
