"""The Example sections of the format and ΔW modules run and print what they say."""

from __future__ import annotations

import doctest
import importlib

import pytest


@pytest.mark.parametrize("name", ["reflora.io.kohya", "reflora.io.gguf", "reflora.io._common",
                                  "reflora.arithmetic.delta", "reflora.arithmetic.compare"])
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0, result
