"""reflora.testing.check_combine judged both ways: correct combiners pass, the known defects fail.

Correct: reflora.combine ("exact", "cat", "svd" at full rank) in every dtype; an independent
torch implementation (to="torch"); PEFT 0.21.2's own add_weighted_adapter("cat") on plain
LoRA. Mutants, each a defect seen in the wild: cross terms for several adapters (PEFT
#3004), the sign applied to both factors (pre PEFT #2918), the weight applied to both
factors, the result keeping rsLoRA (PEFT #3449/#3473), the first adapter's scale kept
for all, DoRA's magnitude reset to ||W|| (PEFT #3761) or added up like a weight, and
the magnitude dropped. PEFT's real cat with rsLoRA is caught too.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

import reflora
import reflora.testing as rt
from reflora.backend import to_numpy

DTYPES = ["float64", "float32", "float16", "bfloat16"]
N = 25  # examples per run (derandomized: the same problems every run)


def _host(a):
    if type(a).__module__.startswith("torch"):
        return a.detach().cpu().float().numpy() if str(a.dtype) == "torch.bfloat16" else a.detach().cpu().numpy()
    return np.asarray(to_numpy(a))


def _reflora_ads(adapters):
    return [reflora.LoraAdapter.from_arrays(a["A"], a["B"], alpha=a["alpha"], use_rslora=a["use_rslora"],
                                            W=a.get("W"), magnitude=a.get("magnitude"), lora_bias=a.get("lora_bias"))
            for a in adapters]


def _out(c):
    d = {"A": c.A, "B": c.B, "alpha": c.alpha, "use_rslora": c.use_rslora}
    if c.magnitude is not None:
        d["magnitude"] = c.magnitude
    if c.lora_bias is not None:
        d["lora_bias"] = c.lora_bias
    return d


def reflora_exact(adapters, weights):
    return _out(reflora.combine(_reflora_ads(adapters), weights))


def reflora_cat(adapters, weights):
    return _out(reflora.combine(_reflora_ads(adapters), weights, method="cat"))


def reflora_svd_full(adapters, weights):
    ads = _reflora_ads(adapters)
    return _out(reflora.combine(ads, weights, method="svd", svd_rank=sum(a.config.rank for a in ads)))


def torch_cat(adapters, weights):
    """An independent implementation in torch: concatenate ranks, fold w s into A."""
    import torch

    As, Bs = [], []
    for a, w in zip(adapters, weights):
        R = a["A"].shape[0]
        s = a["alpha"] / (math.sqrt(R) if a["use_rslora"] else R)
        As.append(a["A"] * (w * s))
        Bs.append(a["B"])
    A, B = torch.cat(As, 0), torch.cat(Bs, 1)
    return {"A": A, "B": B, "alpha": float(A.shape[0]), "use_rslora": False}


def peft_cat(adapters, weights, *, default_f64=True):
    """PEFT 0.21.2's add_weighted_adapter(combination_type="cat") on a one-layer model (float64).

    PEFT builds its weight tensors with torch.tensor(list), in torch's default dtype: float64 needs
    torch.set_default_dtype(torch.float64) or the weights are rounded to float32 (default_f64=False)."""
    import torch

    old = torch.get_default_dtype()
    if default_f64:
        torch.set_default_dtype(torch.float64)
    try:
        return _peft_cat(adapters, weights)
    finally:
        torch.set_default_dtype(old)


def _peft_cat(adapters, weights):
    import peft
    import torch
    from torch import nn

    O, I = adapters[0]["B"].shape[0], adapters[0]["A"].shape[1]
    model = None
    for i, a in enumerate(adapters):
        cfg = peft.LoraConfig(r=a["A"].shape[0], lora_alpha=a["alpha"], use_rslora=a["use_rslora"],
                              target_modules=["lin"])
        if model is None:
            model = peft.get_peft_model(nn.ModuleDict({"lin": nn.Linear(I, O)}).double(), cfg, adapter_name="a0")
        else:
            model.add_adapter(f"a{i}", cfg)
    layer = model.base_model.model["lin"]
    with torch.no_grad():
        for i, a in enumerate(adapters):
            layer.lora_A[f"a{i}"].weight.copy_(torch.from_numpy(np.array(a["A"], dtype=np.float64)))
            layer.lora_B[f"a{i}"].weight.copy_(torch.from_numpy(np.array(a["B"], dtype=np.float64)))
    names = [f"a{i}" for i in range(len(adapters))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_weighted_adapter(names, list(weights), "comb", combination_type="cat")
    cfg = model.peft_config["comb"]
    return {"A": layer.lora_A["comb"].weight.detach().numpy(), "B": layer.lora_B["comb"].weight.detach().numpy(),
            "alpha": float(cfg.lora_alpha), "use_rslora": cfg.use_rslora}


# ---------------------------------------------------------------- mutants


def _np(adapters):
    """Host float64 copies of the candidate inputs (the mutants are written in NumPy)."""
    return [{k: (_host(v).astype(np.float64) if hasattr(v, "shape") else v) for k, v in a.items()} for a in adapters]


def _s(a):
    R = a["A"].shape[0]
    return a["alpha"] / (math.sqrt(R) if a["use_rslora"] else R)


def mutant_cross_terms(adapters, weights):
    """PEFT's "linear" (#3004): Σ sqrt|w s| B_i times Σ sign sqrt|w s| A_i, ranks padded to the largest."""
    ads = _np(adapters)
    R = max(a["A"].shape[0] for a in ads)
    A = sum(math.copysign(math.sqrt(abs(w * _s(a))), w * _s(a)) * np.pad(a["A"], ((0, R - a["A"].shape[0]), (0, 0)))
            for a, w in zip(ads, weights))
    B = sum(math.sqrt(abs(w * _s(a))) * np.pad(a["B"], ((0, 0), (0, R - a["B"].shape[1])))
            for a, w in zip(ads, weights))
    return {"A": A, "B": B, "alpha": float(R), "use_rslora": False}


def mutant_sign_on_both(adapters, weights):
    """Before PEFT #2918: sign(w) sqrt|w s| on A *and* B, so a negative weight cancels itself."""
    ads = _np(adapters)
    A = np.concatenate([math.copysign(math.sqrt(abs(w * _s(a))), w) * a["A"] for a, w in zip(ads, weights)])
    B = np.concatenate([math.copysign(math.sqrt(abs(w * _s(a))), w) * a["B"] for a, w in zip(ads, weights)], 1)
    return {"A": A, "B": B, "alpha": float(A.shape[0]), "use_rslora": False}


def mutant_weight_on_both(adapters, weights):
    """The weight on both factors: the update scales with w^2."""
    ads = _np(adapters)
    A = np.concatenate([w * _s(a) * a["A"] for a, w in zip(ads, weights)])
    B = np.concatenate([w * a["B"] for a, w in zip(ads, weights)], 1)
    return {"A": A, "B": B, "alpha": float(A.shape[0]), "use_rslora": False}


def mutant_rslora_inherited(adapters, weights):
    """PEFT #3449/#3473: scales folded in, alpha = new rank, but use_rslora inherited from the first adapter."""
    out = reflora_cat(adapters, weights)
    return {**out, "use_rslora": bool(adapters[0]["use_rslora"])}


def mutant_first_scale(adapters, weights):
    """Only the weights folded in; the result keeps the first adapter's alpha and rsLoRA flag at rank ΣR."""
    ads = _np(adapters)
    A = np.concatenate([w * a["A"] for a, w in zip(ads, weights)])
    B = np.concatenate([a["B"] for a in ads], 1)
    return {"A": A, "B": B, "alpha": ads[0]["alpha"] * A.shape[0] / ads[0]["A"].shape[0],
            "use_rslora": ads[0]["use_rslora"]}


def mutant_dora_magnitude_reset(adapters, weights):
    """PEFT #3761: the factors concatenated, the new magnitude left at its initial ||W||_row."""
    ads = _np(adapters)
    out = reflora_cat([{k: v for k, v in a.items() if k not in ("magnitude",)} for a in ads], weights)
    return {**out, "magnitude": np.linalg.norm(ads[0]["W"], axis=1)}


def mutant_dora_magnitude_summed(adapters, weights):
    """The magnitudes combined like weights, m' = Σ w_i m_i / Σ w_i, next to the concatenated factors."""
    ads = _np(adapters)
    out = reflora_cat([{k: v for k, v in a.items() if k not in ("magnitude",)} for a in ads], weights)
    tot = sum(weights) or 1.0
    return {**out, "magnitude": sum(w * a["magnitude"] for a, w in zip(ads, weights)) / tot}


def mutant_dora_dropped(adapters, weights):
    """DoRA inputs treated as plain LoRA: no magnitude in the result."""
    ads = _np(adapters)
    return reflora_cat([{k: v for k, v in a.items() if k not in ("magnitude", "W")} for a in ads], weights)


def mutant_lora_bias_dropped(adapters, weights):
    """PEFT #3761: the combined adapter has no (or a zero) lora_B bias."""
    out = reflora_cat([{k: v for k, v in a.items() if k != "lora_bias"} for a in adapters], weights)
    return {**out, "lora_bias": 0 * _host(adapters[0]["lora_bias"])}


def mutant_lora_bias_unscaled(adapters, weights):
    """The biases summed with the weights but without their adapters' scales: c' = Σ w_i c_i."""
    ads = _np(adapters)
    out = reflora_cat([{k: v for k, v in a.items() if k != "lora_bias"} for a in ads], weights)
    return {**out, "lora_bias": sum(w * a["lora_bias"] for a, w in zip(ads, weights))}


# ---------------------------------------------------------------- correct candidates pass


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cand", [reflora_exact, reflora_cat])
def test_reflora_passes_in_every_dtype(cand, dtype):
    res = rt.check_combine(cand, dtype=dtype, max_examples=N, derandomize=True)
    assert res.examples == N and max(res.worst.values()) < 1


def reflora_exact_via_f32(adapters, weights):
    """LoraAdapter cannot hold a bfloat16 base W: combine in float32 and round the result to bfloat16 once."""
    dt = adapters[0]["A"].dtype
    f32 = [{k: (v.astype(np.float32) if hasattr(v, "shape") else v) for k, v in a.items()} for a in adapters]
    out = reflora_exact(f32, weights)
    return {k: (v.astype(dt) if hasattr(v, "shape") else v) for k, v in out.items()}


@pytest.mark.parametrize("dtype", DTYPES)
def test_reflora_dora_passes_in_every_dtype(dtype):
    cand = reflora_exact_via_f32 if dtype == "bfloat16" else reflora_exact
    res = rt.check_combine(cand, dtype=dtype, dora=True, max_examples=N, derandomize=True)
    assert res.examples == N and max(res.worst.values()) < 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_reflora_lora_bias_passes_in_every_dtype(dtype):
    res = rt.check_combine(reflora_exact, dtype=dtype, lora_bias=True, max_examples=N, derandomize=True)
    assert res.examples == N and max(res.worst.values()) < 1


@pytest.mark.parametrize("dtype", ["float64", "float32"])  # numpy.linalg.svd has no float16/bfloat16
def test_svd_at_full_rank_passes(dtype):
    rt.check_combine(reflora_svd_full, dtype=dtype, max_examples=N, derandomize=True)


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_independent_torch_implementation_passes(dtype):
    pytest.importorskip("torch")
    rt.check_combine(torch_cat, dtype=dtype, to="torch", max_examples=N, derandomize=True)


@pytest.mark.interop
def test_peft_cat_passes_on_plain_lora_and_is_caught_on_rslora():
    pytest.importorskip("peft")
    rt.check_combine(peft_cat, dtype="float64", rslora=False, max_examples=10, derandomize=True)
    with pytest.raises(AssertionError, match=r"sqrt\(R'\)"):
        rt.check_combine(peft_cat, dtype="float64", max_examples=10, derandomize=True)


@pytest.mark.interop
def test_peft_rounds_its_weights_to_float32_unless_the_default_dtype_is_float64():
    """A finding: in float64, PEFT's combination is only float32-accurate under torch's default dtype
    (one adapter goes through "linear", whose sqrt(w s) factors sit in a float32 tensor)."""
    pytest.importorskip("peft")

    def f32_default(adapters, weights):
        return peft_cat(adapters, weights, default_f64=False)

    with pytest.raises(AssertionError, match="identity"):
        rt.check_combine(f32_default, dtype="float64", rslora=False, max_examples=10, derandomize=True)
    rt.check_combine(f32_default, dtype="float32", rslora=False, max_examples=10, derandomize=True)


def test_exact_false_accepts_peft_linear_semantics():
    """PEFT's "linear" owes only the one-adapter identities: exact=False checks just those."""
    def linear(adapters, weights):
        return _out(reflora.combine(_reflora_ads(adapters), weights, method="linear"))

    rt.check_combine(linear, dtype="float64", exact=False, max_examples=N, derandomize=True)
    with pytest.raises(AssertionError, match="sum"):
        rt.check_combine(linear, dtype="float64", max_examples=N, derandomize=True, max_rank=3)


# ---------------------------------------------------------------- mutants are caught


MUTANTS = [
    (mutant_cross_terms, "sum"),
    (mutant_sign_on_both, "scaling"),
    (mutant_weight_on_both, "scaling"),
    (mutant_rslora_inherited, "identity|rsLoRA"),
    (mutant_first_scale, "sum|cat|linearity"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mutant,where", MUTANTS, ids=[m.__name__ for m, _ in MUTANTS])
def test_mutants_are_caught(mutant, where, dtype):
    with pytest.raises(AssertionError, match=where) as info:
        rt.check_combine(mutant, dtype=dtype, max_examples=N, derandomize=True)
    assert "rt.check_combine_problem(combine, rt.CombineProblem(" in str(info.value)


DORA_MUTANTS = [
    (mutant_dora_magnitude_reset, "identity"),
    (mutant_dora_magnitude_summed, "scaling|sum|cat|linearity"),
    (mutant_dora_dropped, "no DoRA magnitude"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mutant,where", DORA_MUTANTS, ids=[m.__name__ for m, _ in DORA_MUTANTS])
def test_dora_mutants_are_caught(mutant, where, dtype):
    with pytest.raises(AssertionError, match=where):
        rt.check_combine(mutant, dtype=dtype, dora=True, max_examples=N, derandomize=True)


LORA_BIAS_MUTANTS = [(mutant_lora_bias_dropped, "identity"), (mutant_lora_bias_unscaled, "identity|scaling")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mutant,where", LORA_BIAS_MUTANTS, ids=[m.__name__ for m, _ in LORA_BIAS_MUTANTS])
def test_lora_bias_mutants_are_caught(mutant, where, dtype):
    with pytest.raises(AssertionError, match=where):
        rt.check_combine(mutant, dtype=dtype, lora_bias=True, max_examples=N, derandomize=True)
    # a candidate that ignores lora_bias altogether is told so
    with pytest.raises(AssertionError, match="no lora_bias"):
        rt.check_combine(
            lambda ads, ws: reflora_cat([{k: v for k, v in a.items() if k != "lora_bias"} for a in ads], ws),
            dtype=dtype, lora_bias=True, max_examples=N, derandomize=True)


def test_a_raising_candidate_fails_with_the_reason():
    def boom(adapters, weights):
        raise RuntimeError("no")

    with pytest.raises(AssertionError, match="raised RuntimeError: no"):
        rt.check_combine(boom, dtype="float32", max_examples=2, derandomize=True)


def test_reproduction_reruns_the_case():
    with pytest.raises(AssertionError) as info:
        rt.check_combine(mutant_cross_terms, dtype="float32", max_examples=N, derandomize=True)
    line = next(ln.strip() for ln in str(info.value).splitlines() if "check_combine_problem" in ln)
    with pytest.raises(AssertionError, match="sum"):
        eval(line, {"rt": rt, "combine": mutant_cross_terms})  # noqa: S307 - the message's own reproduction


def test_bad_arguments():
    with pytest.raises(TypeError, match="dtype"):
        rt.check_combine(reflora_exact, dtype="int8")
    with pytest.raises(ValueError, match="max_rank"):
        rt.check_combine(reflora_exact, max_rank=0)
    with pytest.raises(TypeError, match=r"max_rank is 2.0 \(float\)"):
        rt.check_combine(reflora_exact, max_rank=2.0)
    with pytest.raises(ValueError, match="dora and lora_bias"):
        rt.check_combine(reflora_exact, dora=True, lora_bias=True)
