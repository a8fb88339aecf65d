"""The built-in strategies, registered as a plugin (after every third-party strategy)."""

from __future__ import annotations

from ..hookspecs import hookimpl
from . import category, layer, model, shielded

STRATEGIES = {"category": category.select, "layer": layer.select, "model": model.select,
              "shielded": shielded.select}


@hookimpl(trylast=True)
def hft_strategy_names():
    return list(STRATEGIES)


@hookimpl(trylast=True)
def hft_select_half(layout, config, round, attempt):
    strategy = STRATEGIES.get(config.strategy)
    return None if strategy is None else strategy(layout, config, round, attempt)
