"""reflora.testing: check your own LoRA implementation against the reference.

    import reflora.testing as rt
    rt.check_forward(my_forward, dtype="bfloat16", to="torch")
    rt.check_backward(my_backward, dtype="float16", to="torch")

The candidate protocols, the derived tolerance policy and the pytest suite are
documented in ``reflora.testing.checks``, ``reflora.testing.tolerance`` and
``reflora.testing.suite``; golden vectors for non-Python implementations in
``reflora.testing.golden`` (``reflora golden write|check``).

Importing this package needs neither torch nor hypothesis; running a check
needs hypothesis (the ``test`` extra: ``pip install reflora[test]``).
"""

from .checks import (CheckResult, check_backward, check_backward_problem, check_forward, check_forward_problem,
                     check_merge, check_merge_problem, check_metamorphic, check_metamorphic_problem, check_roundtrip,
                     check_roundtrip_problem, check_scale, check_sgd, check_sgd_problem, converter)
from .problems import Problem, SGDOptions
from .tolerance import (DEFAULTS, Tolerance, TolerancePolicy, emulate_backward, emulate_forward, emulate_merge,
                        emulate_train)
# Adam / AdamW training steps (issue 15)
from .optim_checks import AdamOptions, check_adam, check_adam_problem, check_adamw, check_adamw_problem
# issue 10: the new protocols (unmerge, init) and the error envelope
from .checks import (check_dora_backward, check_dora_backward_problem, check_dora_forward, check_dora_forward_problem, check_init, check_init_config, check_lora_bias_backward, check_lora_bias_backward_problem,
                     check_lora_bias_forward, check_lora_bias_forward_problem, check_unmerge, check_unmerge_problem)
from .envelope import backward_envelope, forward_envelope, merge_envelope
from .envelope_train import train_envelope

__all__ = [
    "CheckResult",
    "DEFAULTS",
    "Problem",
    "SGDOptions",
    "Tolerance",
    "TolerancePolicy",
    "check_backward",
    "check_backward_problem",
    "check_forward",
    "check_forward_problem",
    "check_merge",
    "check_merge_problem",
    "check_metamorphic",
    "check_metamorphic_problem",
    "check_roundtrip",
    "check_roundtrip_problem",
    "check_scale",
    "check_sgd",
    "check_sgd_problem",
    "converter",
    "emulate_backward",
    "emulate_forward",
    "emulate_merge",
    "emulate_train",
    # Adam / AdamW training steps (issue 15)
    "AdamOptions",
    "check_adam",
    "check_adam_problem",
    "check_adamw",
    "check_adamw_problem",
    # issue 10
    "backward_envelope",
    "check_dora_backward",
    "check_dora_backward_problem",
    "check_dora_forward",
    "check_dora_forward_problem",
    "check_init",
    "check_init_config",
    "check_lora_bias_backward",
    "check_lora_bias_backward_problem",
    "check_lora_bias_forward",
    "check_lora_bias_forward_problem",
    "check_unmerge",
    "check_unmerge_problem",
    "forward_envelope",
    "merge_envelope",
    "train_envelope",
]

# combination checks (issue 16)
from .combine_checks import CombineProblem, check_combine, check_combine_problem  # noqa: E402

__all__ += ["CombineProblem", "check_combine", "check_combine_problem"]

# golden cases for adapter-format converters in other languages (issue 16, branch formats)
from .format_golden import FORMAT_CASES, check_converted, write_format_cases  # noqa: E402

__all__ += ["FORMAT_CASES", "check_converted", "write_format_cases"]
