"""The Adam/AdamW kit judged both ways: torch.optim passes in every dtype, each listed bug fails in every dtype."""

from __future__ import annotations

import math

import numpy as np
import pytest

import reflora.testing as rt
from reflora.testing.optim_checks import AdamOptions, adam_option_grid, adam_problem

DTYPES = ["float32", "float16", "bfloat16"]


def _torch_step(cls_name):
    import torch

    cls = getattr(torch.optim, cls_name)

    def step(params, grads, state, *, lr, betas, eps, weight_decay, amsgrad, maximize, loraplus_lr_ratio, max_norm):
        if state is None:
            tA, tB = params["A"].clone().requires_grad_(True), params["B"].clone().requires_grad_(True)
            opt = cls([{"params": [tA]}, {"params": [tB], "lr": lr * loraplus_lr_ratio}], lr=lr, betas=betas,
                      eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
            state = (tA, tB, opt)
        tA, tB, opt = state
        with torch.no_grad():
            tA.copy_(params["A"])
            tB.copy_(params["B"])
        tA.grad, tB.grad = grads["A"].clone(), grads["B"].clone()
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_([tA, tB], max_norm)
        opt.step()
        return {"A": tA.detach().clone(), "B": tB.detach().clone()}, state

    return step


def _numpy_step(decoupled, mutation=None):
    """A plain NumPy Adam/AdamW (state in float64, params rounded to their dtype), with one optional bug."""

    def step(params, grads, state, *, lr, betas, eps, weight_decay, amsgrad, maximize, loraplus_lr_ratio, max_norm):
        dt = params["A"].dtype
        p = {k: v.astype(np.float64) for k, v in params.items()}
        g = {k: v.astype(np.float64) for k, v in grads.items()}
        if state is None:
            state = {"t": 0, **{f"{s}{k}": np.zeros_like(p[k]) for s in ("m", "v", "vmax") for k in p}}
        state = dict(state)
        if max_norm is not None:
            if mutation == "clip_per_tensor":
                g = {k: x * min(max_norm / (np.linalg.norm(x) + 1e-6), 1.0) for k, x in g.items()}
            else:
                total = math.sqrt(sum(float(np.sum(x * x)) for x in g.values()))
                g = {k: x * min(max_norm / (total + 1e-6), 1.0) for k, x in g.items()}
        t_used = state["t"] if mutation == "step_from_0" else state["t"] + 1
        state["t"] += 1
        b1, b2 = betas
        bc1, bc2 = (1.0, 1.0) if mutation == "no_bias_correction" else (1 - b1 ** t_used, 1 - b2 ** t_used)
        lrs = {"A": lr, "B": lr * loraplus_lr_ratio}
        if mutation == "loraplus_on_A":
            lrs = {"A": lr * loraplus_lr_ratio, "B": lr}
        out = {}
        with np.errstate(all="ignore"):
            for k in p:
                gk = -g[k] if maximize else g[k]
                pk = p[k]
                coupled = (not decoupled) != (mutation == "wrong_decay")
                if weight_decay:
                    if coupled:
                        gk = gk + weight_decay * pk
                    else:
                        pk = pk * (1 - lrs[k] * weight_decay)
                m = state[f"m{k}"] = b1 * state[f"m{k}"] + (1 - b1) * gk
                v = state[f"v{k}"] = b2 * state[f"v{k}"] + (1 - b2) * gk * gk
                if amsgrad:
                    q = v / bc2 if mutation == "amsgrad_max_of_corrected" else v
                    state[f"vmax{k}"] = np.maximum(state[f"vmax{k}"], q)
                    v = state[f"vmax{k}"] * (bc2 if mutation == "amsgrad_max_of_corrected" else 1.0)
                if mutation == "eps_inside_sqrt":
                    denom = np.sqrt(v / bc2 + eps)
                elif mutation == "bias_correction_on_eps":
                    denom = (np.sqrt(v) + eps) / math.sqrt(bc2)
                else:
                    denom = np.sqrt(v) / math.sqrt(bc2) + eps
                out[k] = pk - np.float64(lrs[k]) / bc1 * m / denom  # bc1 = 0 gives inf, as tensors do
        return {k: v.astype(dt) for k, v in out.items()}, state

    return step


def _to_bf16_aware_numpy(a):
    return a.copy()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls", ["AdamW", "Adam"])
def test_torch_optim_passes(cls, dtype):
    pytest.importorskip("torch")
    check = rt.check_adamw if cls == "AdamW" else rt.check_adam
    res = check(_torch_step(cls), dtype=dtype, to="torch")
    assert res.examples == 2 * 64 and max(res.worst.values()) < 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decoupled", [True, False])
def test_plain_numpy_implementation_passes(decoupled, dtype):
    check = rt.check_adamw if decoupled else rt.check_adam
    res = check(_numpy_step(decoupled), dtype=dtype)
    assert max(res.worst.values()) < 1


MUTANTS = ["eps_inside_sqrt", "no_bias_correction", "bias_correction_on_eps", "wrong_decay",
           "amsgrad_max_of_corrected", "step_from_0", "loraplus_on_A", "clip_per_tensor"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mutation", MUTANTS)
@pytest.mark.parametrize("decoupled", [True, False])
def test_each_bug_is_caught(decoupled, mutation, dtype):
    check = rt.check_adamw if decoupled else rt.check_adam
    with pytest.raises(AssertionError, match=r"(is wrong|candidate gives|raised).*\n(.|\n)*Reproduce"):
        check(_numpy_step(decoupled, mutation), dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_option_is_observable_in_every_dtype(dtype):
    """For each option, some grid setting where flipping it alone moves a result beyond the kit's tolerance.

    (The kit runs the whole grid, so a bug confined to one option cannot hide.) The tolerance is the kit's:
    K * (emulated error so far) + K u max|reference|, computed here for the unflipped setting.
    """
    from reflora.testing.optim_checks import _UNIT, K, _emulate, _reference

    flips = {"amsgrad": "amsgrad", "maximize": "maximize", "weight_decay": "weight_decay", "betas": "betas",
             "eps": "eps", "loraplus_lr_ratio": "loraplus_lr_ratio", "max_norm": "max_norm"}
    other_value = {"amsgrad": lambda v: not v, "maximize": lambda v: not v, "weight_decay": lambda v: 0.25 - v,
                   "betas": lambda v: (0.5, 0.5) if v == (0.75, 0.875) else (0.75, 0.875),
                   "eps": lambda v: v / 16, "loraplus_lr_ratio": lambda v: 5.0 - v,
                   "max_norm": lambda v: None if v is not None else 0.5}
    for decoupled in (True, False):
        for name in flips:
            seen = 0.0
            for seed in range(2):
                prob = adam_problem(seed, 5)
                for opts in adam_option_grid():
                    flipped = AdamOptions(**{**opts.as_kwargs(), "steps": 5,
                                             name: other_value[name](getattr(opts, name))})
                    ref, alt = _reference(prob, opts, decoupled), _reference(prob, flipped, decoupled)
                    emul = _emulate(prob, opts, decoupled, dtype)
                    for k in ("A", "B"):
                        err = 0.0
                        for t in range(5):
                            err = max(err, float(np.max(np.abs(emul[t][k] - ref[t][k]))))
                            bound = K * err + K * _UNIT[dtype] * float(np.max(np.abs(ref[t][k])))
                            seen = max(seen, float(np.max(np.abs(alt[t][k] - ref[t][k]))) / bound)
                if seen > 2:
                    break
            assert seen > 2, f"{name} (decoupled={decoupled}) moves results by at most {seen:.3g} x the tolerance"


def test_grid_and_problems_are_exact_in_bfloat16():
    import ml_dtypes

    bf = np.dtype(ml_dtypes.bfloat16)
    prob = adam_problem(1, 8)
    for a in [prob["A"], prob["B"], *[g[k] for g in prob["grads"] for k in g]]:
        np.testing.assert_array_equal(a.astype(bf).astype(np.float64), a)
    for o in adam_option_grid():
        for x in (o.lr, *o.betas, o.eps, o.weight_decay, 1 - o.lr * o.weight_decay, 1 - o.betas[0], 1 - o.betas[1]):
            assert float(np.float64(x).astype(bf)) == x
    assert len(adam_option_grid()) == 64


def test_bad_dtype_and_bad_return_are_reported():
    # TypeError, as check_forward and check_combine raise it for a dtype they do not take
    with pytest.raises(TypeError, match="expected 'float32', 'float16' or 'bfloat16'"):
        rt.check_adamw(_numpy_step(True), dtype="float64")
    with pytest.raises(AssertionError, match="expected \\(params dict, state\\)"):
        rt.check_adamw(lambda p, g, s, **kw: p, dtype="float32")


def test_a_check_that_could_not_fail_is_refused():
    """seeds=0 or steps=0 ran no step and passed a candidate that never moves; steps=1 cannot see amsgrad."""
    frozen = lambda params, grads, state, **kw: (params, state)  # noqa: E731
    for kw, exc in ((dict(seeds=0), ValueError), (dict(steps=0), ValueError), (dict(steps=1), ValueError),
                    (dict(seeds=1.0), TypeError)):
        with pytest.raises(exc, match=f"{next(iter(kw))} is"):
            rt.check_adamw(frozen, **kw)
    with pytest.raises(ValueError, match="options.steps is 0"):
        rt.check_adamw_problem(frozen, 0, AdamOptions(steps=0))
    # why steps >= 2: with one step, amsgrad's max of the wrong quantity is invisible (v_max = v)
    bug = _numpy_step(True, "amsgrad_max_of_corrected")
    for o in adam_option_grid(steps=1):
        rt.check_adamw_problem(bug, 0, o)
    with pytest.raises(AssertionError, match="is wrong"):
        rt.check_adamw(bug, steps=2, seeds=1)


def _optax_step(decoupled, *, torch_clip=True):
    """optax as users chain it, one chain per tensor (LoRA+): adamw, or add_decayed_weights + adam (L2).

    Clipping: torch's coefficient max_norm / (norm + 1e-6) on optax.global_norm, or (torch_clip=False)
    optax.clip_by_global_norm, which has no 1e-6.
    """
    import jax.numpy as jnp
    import optax

    def step(params, grads, state, *, lr, betas, eps, weight_decay, amsgrad, maximize, loraplus_lr_ratio, max_norm):
        b1, b2 = betas
        if state is None:
            def chain(rate):
                core = optax.scale_by_amsgrad(b1, b2, eps) if amsgrad else optax.scale_by_adam(b1, b2, eps)
                decay = optax.add_decayed_weights(weight_decay)
                # AdamW: p - rate (u + wd p); Adam: the decay enters the gradient first
                parts = (core, decay) if decoupled else (decay, core)
                return optax.chain(*parts, optax.scale(-rate))
            txs = {"A": chain(lr), "B": chain(lr * loraplus_lr_ratio)}
            state = (txs, {k: txs[k].init(params[k]) for k in params})
        txs, states = state
        g = dict(grads)
        if max_norm is not None:
            if torch_clip:
                coef = jnp.minimum(max_norm / (optax.tree.norm(g) + 1e-6), 1.0)
                g = {k: (v * coef).astype(v.dtype) for k, v in g.items()}
            else:
                g, _ = optax.clip_by_global_norm(max_norm).update(g, optax.EmptyState())
        g = {k: (-v if maximize else v) for k, v in g.items()}
        new, new_states = {}, {}
        for k in params:
            upd, new_states[k] = txs[k].update(g[k], states[k], params[k])
            new[k] = optax.apply_updates(params[k], upd)
        return new, (txs, new_states)

    return step


def _optax_grid(amsgrad):
    # maximize: optax has none, and negating g also flips an L2 term's sign, so those settings are left out
    return [o for o in adam_option_grid() if o.amsgrad == amsgrad and not (o.maximize and o.weight_decay)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decoupled", [True, False])
def test_optax_passes_where_its_conventions_are_torchs(decoupled, dtype):
    pytest.importorskip("optax")
    check = rt.check_adamw_problem if decoupled else rt.check_adam_problem
    worst = max(max(check(_optax_step(decoupled), seed, o, dtype=dtype, to="jax").values())
                for seed in range(1) for o in _optax_grid(False))
    assert worst < 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_optax_amsgrad_is_flagged_it_maxes_the_bias_corrected_moment(dtype):
    """optax's scale_by_amsgrad keeps max(nu_max, nu_hat), the bias-corrected second moment; torch the raw one."""
    pytest.importorskip("optax")
    with pytest.raises(AssertionError, match="is wrong"):
        for seed in range(2):
            for o in _optax_grid(True):
                rt.check_adamw_problem(_optax_step(True), seed, o, dtype=dtype, to="jax")


def test_optax_clip_without_torchs_epsilon_is_flagged_in_float32_with_l2_decay():
    """clip_by_global_norm scales by max_norm / norm, torch by max_norm / (norm + 1e-6): with L2 decay the
    relative weight of gradient and decay term moves by ~1e-6 / norm, above float32's tolerance."""
    pytest.importorskip("optax")
    opts = AdamOptions(weight_decay=0.25, loraplus_lr_ratio=4.0, max_norm=0.5)
    with pytest.raises(AssertionError, match="is wrong"):
        for seed in range(2):
            rt.check_adam_problem(_optax_step(False, torch_clip=False), seed, opts, dtype="float32", to="jax")
    rt.check_adam_problem(_optax_step(False), 1, opts, dtype="float32", to="jax")  # with torch's 1e-6 it passes
