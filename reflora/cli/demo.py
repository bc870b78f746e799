"""``reflora demo``: recover a hidden low-rank update with SGD, then check the gradients.

On the seed's defaults (768 x 768, rank 8, alpha 16): a frozen base W and a
hidden update s B* A* make the targets t = x (W + s B* A*)^T; an adapter that
starts at B = 0 is trained by full-batch SGD on the MSE. Then the manual
gradients are compared with central finite differences in float64.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any

import numpy as np

from ..adapter import LoraAdapter
from ..backend import asarray, device_name, get_namespace, host_rng, to_numpy
from ..config import LoraConfig
from ..ops.lora import lora_backward, lora_forward, mse_loss
from ..optim.sgd import SGD
from .progress import ProgressBar


def lowrank_frobenius_diff(A1, B1, s1, A2, B2, s2, xp) -> float:
    """||s1 B1 A1 - s2 B2 A2||_F without forming an O x I product.

    ||P - Q||^2 = ||P||^2 + ||Q||^2 - 2 <P, Q>, and <B1 A1, B2 A2> =
    trace((B1^T B2)(A2 A1^T)): only R x R matrices are formed.
    """
    mT = xp.matrix_transpose

    def inner(Aa, Ba, Ab, Bb):
        return float(xp.sum((mT(Ba) @ Bb) * mT(Ab @ mT(Aa))))

    sq = s1 * s1 * inner(A1, B1, A1, B1) + s2 * s2 * inner(A2, B2, A2, B2) - 2 * s1 * s2 * inner(A1, B1, A2, B2)
    return math.sqrt(max(sq, 0.0))


def gradient_check(x, A, B, W, bias, target, scale, *, seed: int, coords: int = 12, eps: float = 1e-3) -> float:
    """Max relative error of lora_backward vs central finite differences (float64).

    Checks ``coords`` random coordinates of each of x, A and B plus two random
    directions per tensor: (L(p + eps v) - L(p - eps v)) / (2 eps) vs <dL/dp, v>.
    """
    xp = get_namespace("numpy")
    args = {n: np.asarray(to_numpy(a), dtype=np.float64) for n, a in
            {"x": x, "A": A, "B": B, "W": W, "bias": bias, "target": target}.items() if a is not None}

    def loss_at(**over):
        p = {**args, **over}
        y, _ = lora_forward(p["x"], p["A"], p["B"], scale=scale, W=p.get("W"), bias=p.get("bias"))
        return float(mse_loss(y, p["target"])[0])

    y, cache = lora_forward(args["x"], args["A"], args["B"], scale=scale, W=args.get("W"), bias=args.get("bias"))
    _, dy = mse_loss(y, args["target"])
    grads = lora_backward(dy, cache)
    analytic = {"x": grads.dx, "A": grads.dA, "B": grads.dB}
    rng = host_rng(seed)
    worst = 0.0
    for name, g in analytic.items():
        p = args[name]
        directions = []
        for _ in range(coords):
            v = np.zeros_like(p)
            v[tuple(int(rng.integers(n)) for n in p.shape)] = 1.0
            directions.append(v)
        directions += [rng.standard_normal(p.shape) for _ in range(2)]
        for v in directions:
            fd = (loss_at(**{name: p + eps * v}) - loss_at(**{name: p - eps * v})) / (2 * eps)
            an = float(xp.sum(g * v))
            denom = max(abs(fd), abs(an), 1e-12)
            worst = max(worst, abs(fd - an) / denom)
    return worst


def _layouts_row(adapter, x) -> str:
    from ..io.layouts import layouts_roundtrip_error  # noqa: PLC0415

    err = layouts_roundtrip_error(adapter, x)
    return f"{'yes' if err == 0.0 else 'NO'} (max |y_peft - y_seed| + |y_peft - y| = {err:.1e})"


def run_demo(*, in_features=768, out_features=768, rank=8, alpha=16.0, rows=1024, steps=200, lr=2.0,
             momentum=0.9, seed=0, backend=None, dtype="float32", progress=True, out=None) -> dict[str, Any]:
    """Train, check, and return the summary figures (also printed as a table)."""
    out = out or sys.stdout
    t0 = time.perf_counter()
    xp = get_namespace(backend)
    config = LoraConfig(rank=rank, alpha=alpha, in_features=in_features, out_features=out_features)
    rng = host_rng(seed + 1)
    I, O, R, s = in_features, out_features, rank, config.scale
    # data and frozen base, drawn on the host (same numbers on every backend)
    x = rng.standard_normal((rows, I))
    W = rng.uniform(-1 / math.sqrt(I), 1 / math.sqrt(I), size=(O, I))
    # hidden update s B* A*, sized like a typical fine-tuning delta (about 1/2 of W's norm)
    A_true = rng.standard_normal((R, I)) / math.sqrt(I)
    B_true = rng.standard_normal((O, R)) * (0.5 / math.sqrt(3 * R) / s)
    x, W, A_true, B_true = (asarray(a, xp=xp, dtype=dtype) for a in (x, W, A_true, B_true))
    target, _ = lora_forward(x, A_true, B_true, scale=s, W=W)

    adapter = LoraAdapter(config, seed=seed, xp=xp, dtype=dtype, W=W)
    sgd = SGD(lr, momentum=momentum)
    bar = ProgressBar(steps) if progress else None

    def report(i, loss):
        if bar is not None:
            bar.update(i, f"loss {loss:.4e}")

    losses = adapter.fit(x, target, steps=steps, sgd=sgd, callback=report)
    final_loss = float(mse_loss(adapter.forward(x), target)[0])
    rel_update_err = lowrank_frobenius_diff(adapter.A, adapter.B, s, A_true, B_true, s, xp) / \
        lowrank_frobenius_diff(A_true, B_true, s, A_true[:0], B_true[:, :0], 0.0, xp)
    # gradient check at the trained point on a slice of rows, in float64 on the host
    k = min(rows, 64)
    grad_err = gradient_check(x[:k], adapter.A, adapter.B, W, None, target[:k], s, seed=seed)
    summary = {
        "backend": xp.__name__.rsplit(".", 1)[-1],
        "device": device_name(xp),
        "problem": f"x ({rows}, {I}), W ({O}, {I}), rank {R}, alpha {alpha:g} (scale {s:g}), {dtype}",
        "loss first": losses[0] if losses else final_loss,
        "loss last": final_loss,
        "update rel. error": rel_update_err,
        "max rel. grad error": grad_err,
        "params trained": adapter.num_params(),
        # save in the peft and seed layouts, reload both: the outputs must agree exactly
        "layouts agree (peft/seed)": _layouts_row(adapter, x[: min(rows, 64)]),
        "seconds": time.perf_counter() - t0,
    }
    width = max(map(len, summary))
    print(file=out)
    for key, value in summary.items():
        text = f"{value:.3e}" if isinstance(value, float) and key != "seconds" else (
            f"{value:.2f}" if key == "seconds" else str(value))
        print(f"{key:<{width}}  {text}", file=out)
    return summary


def _cmd(args: argparse.Namespace) -> int:
    summary = run_demo(in_features=args.in_features, out_features=args.out_features, rank=args.rank,
                       alpha=args.alpha, rows=args.rows, steps=args.steps, lr=args.lr, momentum=args.momentum,
                       seed=args.seed, backend=args.backend, progress=not args.quiet)
    ok = summary["max rel. grad error"] < 1e-5 and summary["loss last"] < summary["loss first"]
    ok = ok and summary["layouts agree (peft/seed)"].startswith("yes")
    if not ok:
        print("reflora demo: FAILED (gradient check or training)", file=sys.stderr)
    return 0 if ok else 1


def register(sub) -> None:
    p = sub.add_parser("demo", help="train an adapter on a hidden low-rank update and check its gradients")
    p.add_argument("--in-features", type=int, default=768)
    p.add_argument("--out-features", type=int, default=768)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--rows", type=int, default=1024, help="training examples N")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=2.0)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default=None, help="auto|numpy|cupy (default: $REFLORA_BACKEND or auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd)
