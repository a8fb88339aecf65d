"""The runnable examples in the public API's docstrings run: every module's, here and only here (a
test elsewhere that ran a module's examples again would run them twice per session)."""

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


# Modules whose examples are part of their documented contract: each must keep at least one. Counted,
# not run: test_docstring_examples runs them.
WITH_EXAMPLES = ("hft_plugin.config", "hft_plugin.selection", "hft_plugin.freeze", "hft_plugin.testing",
                 "hft_plugin.checkpoints", "hft_plugin.report", "hft_plugin.reset", "hft_plugin.metrics",
                 "hft_plugin.forgetting", "hft_plugin.forgetting_cli", "hft_plugin.adapters.watch",
                 "hft_plugin.adapters.transformers", "hft_plugin.bootstrap.env", "hft_plugin.layouts.generic",
                 "hft_plugin.parsing", "hft_plugin.rounds", "hft_plugin.checks", "hft_plugin.manifest")


def test_the_public_modules_have_examples():
    finder = doctest.DocTestFinder()
    examples = {name: sum(len(test.examples) for test in finder.find(importlib.import_module(name)))
                for name in WITH_EXAMPLES}
    assert all(examples.values()), examples
    assert set(WITH_EXAMPLES) <= set(MODULES) | {"hft_plugin"}


def test_the_readme_demo_runs_and_checks_the_frozen_half(capsys):
    from hft_plugin import demo

    assert demo.main(["--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "frozen elements bit-identical: True" in out and "layout=phi3 (named)" in out
