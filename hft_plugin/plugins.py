"""The one plugin manager: built-in layouts and strategies, then third-party plugins.

Third-party plugins load from the ``hft_plugin`` entry-point group, each in its own try/except so one
broken plugin cannot stop a training run; set ``HFT_DISABLE_PLUGIN_AUTOLOAD=1`` to skip them.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os

import pluggy

from . import hookspecs, switches

logger = logging.getLogger("hft_plugin")

ENTRY_POINT_GROUP = "hft_plugin"

manager = pluggy.PluginManager("hft_plugin")
manager.add_hookspecs(hookspecs)
_loaded = False


def get_manager() -> pluggy.PluginManager:
    """The plugin manager, with the built-ins and (unless disabled) entry-point plugins loaded."""
    global _loaded
    if not _loaded:
        _loaded = True
        from .layouts import builtin as builtin_layouts
        from .strategies import builtin as builtin_strategies

        # Among trylast implementations the first registered runs last: named rules before the generic reader.
        for plugin in (builtin_layouts.NamedLayouts(), builtin_layouts.GenericLayout(), builtin_strategies):
            manager.register(plugin)
        if not autoload_disabled():
            _load_entry_points()
    return manager


def autoload_disabled(environ=None) -> bool:
    """Whether ``HFT_DISABLE_PLUGIN_AUTOLOAD`` is on (an on word of :mod:`hft_plugin.switches`).
    Documented with the other variables in bootstrap/env.py, not read through it: no upward import."""
    environ = os.environ if environ is None else environ
    return switches.read(environ.get("HFT_DISABLE_PLUGIN_AUTOLOAD", "")) is True


def _load_entry_points() -> None:
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            plugin = entry_point.load()
            if manager.get_plugin(entry_point.name) is None:
                manager.register(plugin, name=entry_point.name)
        except Exception as exc:  # a broken third-party plugin must not break training
            logger.warning("hft_plugin: skipped plugin %r (%s: %s)", entry_point.name, type(exc).__name__, exc)
