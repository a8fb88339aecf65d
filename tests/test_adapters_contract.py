"""The contract every adapter keeps, as a base class each adapter's tests subclass.

In process: instrument / uninstrument (patched, a second instrument warns and changes nothing,
uninstrument restores the original functions, a second uninstrument is harmless), and the adapter's
declared version range is what pyproject.toml's extra says.

In fresh interpreters (the import order cannot be undone inside one): import-then-patch,
patch-then-import (the start-up hook armed before the framework is imported, the framework not
imported by arming it), patch twice (never double-wrapped), patch-unpatch-patch.

Subclasses: TestTransformersContract here; LLaMA-Factory in test_llamafactory_contract.py (run in
its own environment by .ci/llamafactory.sh); OpenRLHF in test_openrlhf.py; Axolotl and ms-swift in
test_axolotl.py and test_swift.py (their own environments: .ci/axolotl.sh, .ci/swift.sh).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from hft_plugin.adapters.base import is_patched

ROOT = Path(__file__).resolve().parents[1]

_ORDER_SCRIPT = """
import importlib, json, sys
{prelude}
from hft_plugin.adapters.base import is_patched
from hft_plugin.bootstrap import startup
targets = {targets!r}
trigger = {trigger!r}
name = {name!r}
out = {{}}

def state():
    return [bool(is_patched(sys.modules[m], p)) for m, p in targets]

def wrapper_depth():
    depths = []
    for module, path in targets:
        owner = sys.modules[module]
        *parents, attribute = path.split(".")
        for parent in parents:
            owner = getattr(owner, parent)
        value, depth = owner.__dict__[attribute], 0
        while hasattr(value, "__wrapped__"):
            value, depth = value.__wrapped__, depth + 1
        depths.append(depth)
    return depths

if {import_first!r}:
    importlib.import_module(trigger)
    out["imported_before_arming"] = True
startup.activate({{"HFT_ENABLE": "1"}})
out["imported_by_arming"] = trigger in sys.modules
importlib.import_module(trigger)
out["patched_after_import"] = state()
out["instrumented"] = startup.status()["instrumented"]
adapter = startup._state["instances"][name]
out["second_instrument"] = adapter.instrument()
out["depth_after_twice"] = wrapper_depth()
adapter.uninstrument()
out["patched_after_unpatch"] = state()
out["depth_after_unpatch"] = wrapper_depth()
out["second_instrument_after_unpatch"] = adapter.instrument()
out["patched_after_repatch"] = state()
out["depth_after_repatch"] = wrapper_depth()
adapter.uninstrument()
adapter.uninstrument()
out["patched_at_end"] = state()
print("RESULT " + json.dumps(out))
"""


class AdapterContract:
    """Set ``adapter_class``, ``trigger`` (the module whose import arms the adapter), ``targets``
    ((module, "Class.method"), ...) and, if the framework needs it, ``prelude`` (code run first in
    the fresh interpreters, e.g. stubs of CUDA-only modules)."""

    adapter_class: type
    trigger: str
    targets: tuple[tuple[str, str], ...]
    prelude: str = ""
    extra: str = ""

    # -- in process -------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Import the framework in this process (subclasses stub what cannot be installed)."""
        importlib.import_module(self.trigger)

    def make_adapter(self):
        return self.adapter_class()

    def patched(self) -> list[bool]:
        return [bool(is_patched(sys.modules[m], p)) for m, p in self.targets]

    def originals(self) -> list:
        out = []
        for module, path in self.targets:
            owner = sys.modules[module]
            *parents, attribute = path.split(".")
            for parent in parents:
                owner = getattr(owner, parent)
            out.append(owner.__dict__[attribute])
        return out

    def test_instrument_uninstrument(self, caplog):
        self.prepare()
        before = self.originals()
        adapter = self.make_adapter()
        assert adapter.instrument() is True
        assert all(self.patched())
        with caplog.at_level(logging.WARNING, logger="hft_plugin"):
            assert adapter.instrument() is False
        assert "already active" in caplog.text
        other = self.make_adapter()  # a second instance must not wrap again either
        other_result = other.instrument()
        try:
            wrapped = self.originals()
            assert all(getattr(w, "__wrapped__", None) is b for w, b in zip(wrapped, before))
        finally:
            if other_result:
                other.uninstrument()
        adapter.uninstrument()
        assert not any(self.patched())
        assert self.originals() == before
        adapter.uninstrument()  # harmless
        assert self.originals() == before

    def test_declared_range_is_the_extra(self):
        project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        extra = project["optional-dependencies"][self.extra or self.adapter_class.name]
        normalized = {r.replace(" ", "") for r in extra}
        for requirement in self.adapter_class.instruments:
            assert requirement.replace(" ", "") in normalized, (requirement, extra)

    # -- fresh interpreters -----------------------------------------------------------------------------
    def order_script(self, import_first: bool) -> str:
        """The fresh interpreter's script: instrument before or after the framework is imported."""
        return _ORDER_SCRIPT.format(prelude=textwrap.dedent(self.prelude), targets=list(self.targets),
                                    trigger=self.trigger, name=self.adapter_class.name, import_first=import_first)

    def run_orders(self, import_first: bool) -> dict:
        script = self.order_script(import_first)
        environ = {k: v for k, v in os.environ.items() if not k.startswith("HFT_")}
        result = subprocess.run([sys.executable, "-c", script], env=environ, capture_output=True, text=True,
                                timeout=600, cwd=str(ROOT))
        assert result.returncode == 0, result.stderr[-4000:]
        line = next(l for l in result.stdout.splitlines() if l.startswith("RESULT "))
        return json.loads(line[len("RESULT "):])

    def check_orders(self, out: dict) -> None:
        n = len(self.targets)
        assert out["patched_after_import"] == [True] * n
        assert self.adapter_class.name in out["instrumented"]
        assert out["second_instrument"] is False          # patch twice: a warning, nothing more
        assert out["depth_after_twice"] == [1] * n        # never double-wrapped
        assert out["patched_after_unpatch"] == [False] * n
        assert out["depth_after_unpatch"] == [0] * n
        assert out["second_instrument_after_unpatch"] is True
        assert out["patched_after_repatch"] == [True] * n
        assert out["depth_after_repatch"] == [1] * n
        assert out["patched_at_end"] == [False] * n

    @pytest.mark.slow
    def test_patch_then_import(self):
        out = self.run_orders(import_first=False)
        assert out["imported_by_arming"] is False  # arming the hook imports no framework
        self.check_orders(out)

    @pytest.mark.slow
    def test_import_then_patch(self):
        out = self.run_orders(import_first=True)
        assert out["imported_before_arming"] is True
        self.check_orders(out)


class TestTransformersContract(AdapterContract):
    from hft_plugin.adapters.transformers import TransformersAdapter as adapter_class

    trigger = "transformers.trainer"
    targets = (("transformers.trainer", "Trainer.train"), ("transformers.trainer", "Trainer._prepare_for_training"))
    extra = "trl"


def test_startup_knows_every_adapter_and_every_adapter_has_an_extra():
    from hft_plugin.bootstrap.startup import ADAPTERS

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    for name, (_, reference) in ADAPTERS.items():
        module, _, attribute = reference.partition(":")
        adapter = getattr(importlib.import_module(module), attribute)
        assert adapter.name == name
        key = "trl" if name == "transformers" else name
        assert {r.replace(" ", "") for r in adapter.instruments} <= {r.replace(" ", "") for r in extras[key]}
