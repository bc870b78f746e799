"""The Example sections of the serving modules run and print what they say (doctest)."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["reflora.serving.multi", "reflora.serving.shrink_expand", "reflora.serving.embedding",
           "reflora.serving.tp", "reflora.testing.serving_golden"]


@pytest.mark.parametrize("name", MODULES)
def test_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0, result
