"""The runnable examples in the public API's docstrings run."""

import doctest
import importlib

import pytest

MODULES = ["hft_plugin.config", "hft_plugin.selection", "hft_plugin.freeze", "hft_plugin.testing"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
