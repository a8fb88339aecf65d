"""The hooks through which strategies and layouts plug into hft-plugin.

Implement them in a module or class marked with :data:`hookimpl` and register it either at run time
(``hft_plugin.plugins.manager.register(obj)``) or through the ``hft_plugin`` entry-point group::

    [project.entry-points.hft_plugin]
    my_strategy = "my_package.hft_strategy"

The built-in layouts and strategies are registered ``trylast`` through these same hooks, so a
plugin's answer always comes first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from torch import nn

    from .config import HFTConfig
    from .layouts.base import Layout

hookspec = pluggy.HookspecMarker("hft_plugin")
hookimpl = pluggy.HookimplMarker("hft_plugin")


@hookspec(firstresult=True)
def hft_read_layout(model: "nn.Module") -> "Layout | None":
    """Read ``model`` into transformer layers, roles and units.

    Return a :class:`~hft_plugin.layouts.base.Layout`, or None to let the next reader try.
    ``firstresult``: the first reader that returns a Layout wins; the built-in named-family reader
    runs before the built-in generic reader, and both after every plugin. A reader that recognises
    the model but cannot place some of its parameters raises ``LayoutError`` naming them.
    Read sizes with ``hft_plugin.layouts.base.param_shape`` so meta and ZeRO-3 models work.
    """


@hookspec
def hft_strategy_names() -> "list[str]":
    """Return the names of the strategies this plugin implements.

    Every plugin's list is joined; ``select_half`` rejects a strategy no plugin names, before
    anything on the model changes.
    """


@hookspec(firstresult=True)
def hft_select_half(layout: "Layout", config: "HFTConfig", round: int, attempt: int) -> "set[str] | None":
    """Choose which units of ``layout`` train in ``round``.

    Return the set of trainable unit keys, or None when ``config.strategy`` is not yours.
    ``firstresult``: the first non-None answer wins.

    The answer must depend only on (layout, config, round, attempt): draw randomness from
    ``hft_plugin.strategies.rng(config, round, attempt)``, never from the global random state, so
    every process of a distributed job chooses the same half without talking. ``attempt`` counts
    redraws: when round r's answer equals round r-1's, the core asks again with attempt + 1.

    A data-driven strategy reads its data from a file named in the config (``config.scores``, as
    the built-in ``shielded`` does): such a file is an input like the seed, so the answer is still
    a pure function of the arguments. When ``config.scores`` is set the core asks once, for
    ``config.round`` only, since earlier rounds chose from other scores; the strategy itself keeps
    round r's answer different from round r-1's (the scores file can record the previous half).
    """
