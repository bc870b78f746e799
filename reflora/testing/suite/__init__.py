"""The conformance suite: every check of reflora.testing against one implementation, under pytest.

    REFLORA_CANDIDATE=mypkg.lora:candidate pytest --pyargs reflora.testing.suite \\
        [--max-examples N] [--derandomize] [--xfails-file FILE]

``REFLORA_CANDIDATE`` is ``module:attribute`` (or just ``module``): an object,
module, class or dict that provides some of these callables (protocols in
``reflora.testing.checks``; A (R, I), B (O, R), W (O, I), x (..., I)):

    forward(x, A, B, *, scale, W=None, bias=None[, dropout_mask=None]) -> y
    backward(x, A, B, dy, *, scale, W=None, bias=None[, dropout_mask=None]) -> (dx, dA, dB)
    train_step(x, target, params, state, *, scale, lr, momentum, dampening,
               weight_decay, nesterov, maximize) -> (params, state)
    merge(W, A, B, *, scale) -> W'
    scaling(rank, alpha, *, use_rslora) -> float
    save(path, A, B) and load(path) -> (A, B)
    unmerge(W', A, B, *, scale) -> W' - s B A
    init(config, *, seed) -> (A, B)    (config: reflora.LoraConfig; judged statistically)
    lora_bias_forward(x, A, B, lora_bias, *, scale, W=None, bias=None) -> y
    lora_bias_backward(x, A, B, lora_bias, dy, *, scale, W=None, bias=None) -> (dx, dA, dB, dlora_bias)
    dora_forward(x, A, B, m, W, *, scale, bias=None) -> y   (DoRA, m the magnitude vector (O,))
    dora_backward(x, A, B, m, W, dy, *, scale, bias=None) -> (dx, dA, dB, dm)   (norm detached, as PEFT)

and optionally these settings:

    dtypes   dtype names it computes in (default ("float32",)); any of
             "float64", "float32", "float16", "bfloat16"
    to       how arrays reach it: "numpy" (default), "torch", "jax", "cupy",
             "array_api_strict" or a callable taking a NumPy array
    layout   "peft" or "seed": the key layout ``save`` writes, so files are
             also checked against reflora.load_adapter / save_adapter
    policy   a reflora.testing.TolerancePolicy (default k = 2, float32 accumulation)

Every callable is optional: a missing one is skipped, and the report header
lists what was found and what was skipped. Tests (ids for ``--xfails-file``):

    test_forward[DTYPE]       check_forward
    test_backward[DTYPE]      check_backward
    test_metamorphic[DTYPE]   batched = looped, zero rank padding, B = 0, merged = unmerged
    test_train_step[DTYPE]    check_sgd: several SGD steps on the MSE loss
    test_merge[DTYPE]         check_merge
    test_roundtrip[DTYPE]     check_roundtrip
    test_scaling              check_scale
    test_unmerge[DTYPE]       check_unmerge
    test_lora_bias_forward[DTYPE], test_lora_bias_backward[DTYPE]
                              check_lora_bias_forward / _backward (PEFT's lora_B.bias)
    test_dora_forward[DTYPE], test_dora_backward[DTYPE]
                              check_dora_forward / _backward
    test_init                 check_init (false-alarm probability <= 3e-6 per configuration, reflora.testing.check_stats)

Options: ``--max-examples N`` (hypothesis examples per test; default 100 for
forward/backward, 10 for roundtrip, 50 for the others), ``--derandomize`` (a fixed, repeatable
sequence of examples), ``--xfails-file FILE`` (one test id or id prefix per
line, e.g. ``test_train_step`` or ``test_forward[bfloat16]``; ``#`` starts a
comment; listed tests are marked xfail, and lines that match no test are
warned about).

The suite is inert unless collected: reflora's own test run never loads it.
"""
