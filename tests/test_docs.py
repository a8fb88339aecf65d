"""The runnable examples in the public API's docstrings run."""

import contextlib
import doctest
import io
import importlib
import pkgutil

import pytest

import hft_plugin

# Every module of the package: examples in docstrings are part of the API and must run. Modules
# that run code on import (``auto`` switches HFT on, ``__main__`` runs the command) are left out.
MODULES = sorted(m.name for m in pkgutil.walk_packages(hft_plugin.__path__, "hft_plugin.")
                 if m.name not in ("hft_plugin.auto", "hft_plugin.__main__"))


@pytest.fixture(scope="module", autouse=True)
def quiet_accelerator_probe():
    """DeepSpeed prints its accelerator choice to stdout the first time the Trainer asks for it,
    which a doctest would read as the example's output: ask once, quietly, beforehand."""
    try:
        from deepspeed.accelerator import get_accelerator
    except ImportError:
        return
    with contextlib.redirect_stdout(io.StringIO()):
        get_accelerator()


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_the_public_modules_have_examples():
    attempted = {name: doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS).attempted
                 for name in ("hft_plugin.config", "hft_plugin.selection", "hft_plugin.freeze", "hft_plugin.testing",
                              "hft_plugin.checkpoints", "hft_plugin.report", "hft_plugin.reset", "hft_plugin.metrics")}
    assert all(attempted.values()), attempted


def test_the_readme_demo_runs_and_checks_the_frozen_half(capsys):
    from hft_plugin import demo

    assert demo.main(["--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "frozen elements bit-identical: True" in out and "layout=phi3 (named)" in out
