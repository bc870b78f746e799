"""The docstring examples of the optimiser modules and the Adam kit run and print what they show."""

from __future__ import annotations

import doctest
import importlib

import pytest


@pytest.mark.parametrize("name", ["reflora.optim.adamw", "reflora.optim.clip", "reflora.optim.groups",
                                  "reflora.testing.optim_checks"])
def test_docstring_examples(name):
    mod = importlib.import_module(name)
    res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert res.attempted > 0 and res.failed == 0, res
