"""The conformance tests run against $REFLORA_CANDIDATE (see the package docstring)."""

from __future__ import annotations

import pytest

import reflora.testing as rt

DTYPES = ("float32", "float16", "bfloat16", "float64")


def candidate_kwargs(candidate, options, default_examples):
    kw = {"max_examples": options["max_examples"] or default_examples, "derandomize": options["derandomize"],
          "to": candidate.to}
    return kw


def resolve_policy(candidate):
    return {"policy": candidate.policy} if candidate.policy is not None else {}


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward(candidate, options, dtype):
    (forward,) = candidate.require("forward")
    candidate.require_dtype(dtype)
    rt.check_forward(forward, dtype=dtype, **candidate_kwargs(candidate, options, 100), **resolve_policy(candidate))


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward(candidate, options, dtype):
    (backward,) = candidate.require("backward")
    candidate.require_dtype(dtype)
    rt.check_backward(backward, dtype=dtype, **candidate_kwargs(candidate, options, 100), **resolve_policy(candidate))


@pytest.mark.parametrize("dtype", DTYPES)
def test_metamorphic(candidate, options, dtype):
    (forward,) = candidate.require("forward")
    candidate.require_dtype(dtype)
    rt.check_metamorphic(forward, merge=candidate.fns.get("merge"), dtype=dtype, **candidate_kwargs(candidate, options, 50),
                         **resolve_policy(candidate))


@pytest.mark.parametrize("dtype", DTYPES)
def test_train_step(candidate, options, dtype):
    (train_step,) = candidate.require("train_step")
    candidate.require_dtype(dtype)
    rt.check_sgd(train_step, dtype=dtype, **candidate_kwargs(candidate, options, 50), **resolve_policy(candidate))


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge(candidate, options, dtype):
    (merge,) = candidate.require("merge")
    candidate.require_dtype(dtype)
    rt.check_merge(merge, dtype=dtype, **candidate_kwargs(candidate, options, 50), **resolve_policy(candidate))


@pytest.mark.parametrize("dtype", DTYPES)
def test_roundtrip(candidate, options, dtype):
    save, load = candidate.require("save", "load")
    candidate.require_dtype(dtype)
    rt.check_roundtrip(save, load, dtype=dtype, layout=candidate.layout, **candidate_kwargs(candidate, options, 10))


def test_scaling(candidate):
    (scaling,) = candidate.require("scaling")
    rt.check_scale(scaling)


@pytest.mark.parametrize("dtype", DTYPES)
def test_unmerge(candidate, options, dtype):
    (unmerge,) = candidate.require("unmerge")
    candidate.require_dtype(dtype)
    rt.check_unmerge(unmerge, dtype=dtype, **candidate_kwargs(candidate, options, 50), **resolve_policy(candidate))


def test_init(candidate, options):
    (init,) = candidate.require("init")
    rt.check_init(init, max_examples=options["max_examples"] or 20, derandomize=options["derandomize"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_bias_forward(candidate, options, dtype):
    (fwd,) = candidate.require("lora_bias_forward")
    candidate.require_dtype(dtype)
    rt.check_lora_bias_forward(fwd, dtype=dtype, **candidate_kwargs(candidate, options, 100), **resolve_policy(candidate))


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_bias_backward(candidate, options, dtype):
    (bwd,) = candidate.require("lora_bias_backward")
    candidate.require_dtype(dtype)
    rt.check_lora_bias_backward(bwd, dtype=dtype, **candidate_kwargs(candidate, options, 100), **resolve_policy(candidate))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dora_forward(candidate, options, dtype):
    (fwd,) = candidate.require("dora_forward")
    candidate.require_dtype(dtype)
    rt.check_dora_forward(fwd, dtype=dtype, **candidate_kwargs(candidate, options, 100), **resolve_policy(candidate))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dora_backward(candidate, options, dtype):
    (bwd,) = candidate.require("dora_backward")
    candidate.require_dtype(dtype)
    rt.check_dora_backward(bwd, dtype=dtype, **candidate_kwargs(candidate, options, 100), **resolve_policy(candidate))
