"""Who owns what the plugin installs (issue 21): the start-up guard judges each optimizer by its own
parameters, a patch stays until its last owner lets it go, every global registration is undone by the
last user, and every place that reads a true/false variable accepts the same words."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest

import hft_plugin.bootstrap.startup as startup
from hft_plugin.adapters.base import Adapter, is_patched, patch, unpatch
from hft_plugin.bootstrap import env

from .helpers import clean_env

ROOT = Path(__file__).resolve().parents[1]


# -- (a) the guard judges the optimizer's own model -----------------------------------------------------
def test_guard_refuses_an_optimizer_over_a_model_without_hft_while_another_has_it(monkeypatch):
    import torch

    from hft_plugin import IntegrationError, apply_selection, select_half
    from hft_plugin.testing import tiny_model

    for name in list(os.environ):
        if name.upper().startswith("HFT_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HFT_ENABLE", "1")
    monkeypatch.setitem(startup.ADAPTERS, "broken", ("json", "hft_plugin.no_such_module:Adapter"))
    with_hft, without_hft = tiny_model("llama"), tiny_model("llama")
    try:
        assert startup.instrument("broken") is False  # HFT asked for and not attached: the guard is armed
        handle = apply_selection(with_hft, select_half(with_hft))
        try:
            torch.optim.SGD(handle.parameters(), lr=0.1)  # the model under HFT: allowed
            torch.optim.SGD((p for p in handle.parameters()), lr=0.1)  # a generator is still read once, whole
            with pytest.raises(IntegrationError, match="no_such_module"):
                torch.optim.SGD(without_hft.parameters(), lr=0.1)  # another model, fully trainable
        finally:
            handle.remove()
    finally:
        startup.deactivate()


# -- (b) a patch stays until its last owner lets it go --------------------------------------------------
def _fake_module():
    module = types.ModuleType("hft_fake_framework")
    module.greet = lambda: "hello"
    return module


class _Shouting(Adapter):
    """An adapter of a third party: it patches without naming an owner."""

    name = "shouting"

    def __init__(self, module):
        super().__init__()
        self.module = module

    def _instrument(self, **options):
        patch(self.module, "greet", lambda wrapped, instance, args, kwargs: wrapped().upper())

    def _uninstrument(self):
        unpatch(self.module, "greet")


def test_two_adapters_of_one_class_the_first_uninstrumenting_leaves_the_second_in_force():
    module = _fake_module()
    first, second = _Shouting(module), _Shouting(module)
    assert first.instrument() and second.instrument()
    first.uninstrument()
    assert module.greet() == "HELLO" and is_patched(module, "greet")
    second.uninstrument()
    assert module.greet() == "hello" and not is_patched(module, "greet")


def test_two_transformers_adapters_the_first_uninstrumenting_leaves_the_second_in_force():
    from hft_plugin.adapters import trainer_auto as adapter_module

    first = adapter_module.TransformersAdapter(config={"ratio": 0.5})
    second = adapter_module.TransformersAdapter(config={"ratio": 0.25})
    targets = [path for path, _ in adapter_module.TransformersAdapter._TARGETS]
    try:
        assert first.instrument() and second.instrument()
        first.uninstrument()
        assert all(is_patched("transformers.trainer", path) for path in targets)
        assert adapter_module._AutoState.adapter is second
    finally:
        first.uninstrument()
        second.uninstrument()
    assert not any(is_patched("transformers.trainer", path) for path in targets)
    assert adapter_module._AutoState.adapter is None


def test_two_axolotl_adapters_the_first_uninstrumenting_leaves_the_plugin_registered(monkeypatch):
    from hft_plugin.adapters import axolotl

    manager = SimpleNamespace(plugins={})
    monkeypatch.setattr(axolotl, "_manager", lambda: manager)
    monkeypatch.setattr(axolotl, "plugin_class", lambda: object)
    monkeypatch.setattr(axolotl.AxolotlAdapter, "instruments", ())
    first, second = axolotl.AxolotlAdapter(), axolotl.AxolotlAdapter()
    assert first.instrument() and second.instrument()
    first.uninstrument()
    assert axolotl.PLUGIN_KEY in manager.plugins
    second.uninstrument()
    assert axolotl.PLUGIN_KEY not in manager.plugins


def test_a_patch_owned_by_name_survives_an_anonymous_unpatch():
    module = _fake_module()
    owner = object()
    assert patch(module, "greet", lambda wrapped, instance, args, kwargs: wrapped() + "!", owner=owner)
    assert unpatch(module, "greet") is False  # not its owner: nothing to let go
    assert module.greet() == "hello!"
    assert unpatch(module, "greet", owner=owner) is True
    assert module.greet() == "hello"


# -- (c) the last user undoes every registration --------------------------------------------------------
def test_deactivate_after_import_auto_takes_back_the_switch_auto_set():
    code = ("import os, hft_plugin.auto, hft_plugin.bootstrap.startup as s; "
            "print(os.environ.get('HFT_ENABLE')); s.deactivate(); print(os.environ.get('HFT_ENABLE'))")
    result = subprocess.run([sys.executable, "-c", code], env=clean_env(), capture_output=True, text=True,
                            timeout=120, cwd=str(ROOT))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "None"]
    # a switch the user set is the user's: it stays
    result = subprocess.run([sys.executable, "-c", code], env=clean_env(HFT_ENABLE="yes"), capture_output=True,
                            text=True, timeout=120, cwd=str(ROOT))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["yes", "yes"]


def test_moe_training_registers_nothing_with_transformers_and_leaves_the_experts_implementation():
    """The experts mechanism computes through a forward on each experts module instance: nothing is
    registered in transformers' ``ExpertsInterface`` and the model's experts implementation is the
    user's, while handles are applied and after the last one is removed."""
    import torch
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

    from hft_plugin import apply_selection, select_half
    from hft_plugin.testing import tiny_model

    def registry() -> tuple[dict, dict]:
        return dict(ExpertsInterface._global_mapping), dict(ALL_EXPERTS_FUNCTIONS._local_mapping)

    def implementations(*models) -> list:
        return [(m.config._experts_implementation, type(m.model.layers[0].mlp.experts).forward) for m in models]

    before = registry()
    models = [tiny_model("mixtral"), tiny_model("mixtral")]
    models[1].set_experts_implementation("eager")
    configured = implementations(*models)
    handles = [apply_selection(m, select_half(m, round=r)) for r, m in enumerate(models)]
    assert all(set(h.mechanisms().values()) == {"experts"} for h in handles)
    batch = torch.randint(0, models[0].config.vocab_size, (2, 8))
    for model, handle in zip(models, handles):
        optimizer = torch.optim.AdamW(handle.parameters(), lr=1e-3)
        handle.attach(optimizer)
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
    assert registry() == before and implementations(*models) == configured
    handles[0].remove()
    assert registry() == before and implementations(*models) == configured
    handles[1].remove()  # the last handle
    assert registry() == before and implementations(*models) == configured
