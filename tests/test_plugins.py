"""Third-party strategies and layouts plug in through the same hooks as the built-ins."""

from __future__ import annotations

import importlib.metadata

import pytest
from torch import nn

from hft_plugin import ConfigError, select_half
from hft_plugin.hookspecs import hookimpl
from hft_plugin.layouts.reader import read_with
from hft_plugin.plugins import get_manager, _load_entry_points
from hft_plugin.testing import tiny_model


class AttentionOnly:
    """A strategy that trains all attention units and nothing else."""

    @hookimpl
    def hft_strategy_names(self):
        return ["attention-only"]

    @hookimpl
    def hft_select_half(self, layout, config, round, attempt):
        if config.strategy != "attention-only":
            return None
        return {u.key for u in layout.units() if u.role == "attention"} if attempt == 0 else set()


class ToyLayout:
    """A layout for a model no built-in reader knows."""

    @hookimpl
    def hft_read_layout(self, model):
        if type(model).__name__ != "Toy":
            return None
        return read_with(model, "toy", lambda path, module: ("mlp", None, None))


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))


@pytest.fixture
def registered():
    manager = get_manager()
    plugins = [AttentionOnly(), ToyLayout()]
    for plugin in plugins:
        manager.register(plugin)
    yield
    for plugin in plugins:
        manager.unregister(plugin)


def test_third_party_strategy(registered):
    model = tiny_model("llama")
    selection = select_half(model, strategy="attention-only")
    assert selection.stats()["roles"]["attention"]["ratio"] == 1.0
    assert selection.stats()["roles"]["mlp"]["ratio"] == 0.0
    assert select_half(model, strategy="category").trainable_ratio == 0.5  # built-ins still answer


def test_third_party_layout_comes_before_the_generic_reader(registered):
    selection = select_half(Toy())
    assert selection.layout_name == "toy"
    assert len(selection.layout.layers) == 4


def test_unknown_strategy_lists_the_known_ones():
    with pytest.raises(ConfigError, match="known strategies: category, layer, model"):
        select_half(tiny_model("llama"), strategy="attention-only")


def test_a_broken_entry_point_is_skipped_with_a_warning(monkeypatch, caplog):
    class Broken:
        name = "broken"

        def load(self):
            raise RuntimeError("boom")

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [Broken()])
    _load_entry_points()
    assert "skipped plugin 'broken'" in caplog.text
    assert select_half(tiny_model("llama")).trainable_ratio == 0.5
