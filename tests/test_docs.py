"""The runnable examples in the public API's docstrings run."""

import doctest
import importlib

import pytest

MODULES = ["hft_plugin.config", "hft_plugin.selection", "hft_plugin.freeze", "hft_plugin.testing"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_the_readme_demo_runs_and_checks_the_frozen_half(capsys):
    from hft_plugin import demo

    assert demo.main(["--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "frozen elements bit-identical: True" in out and "layout=phi3 (named)" in out
