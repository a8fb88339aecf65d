"""Axolotl: Half Fine-Tuning in ``axolotl train`` without code, and a refusal of its own freezing.

    HFT_ENABLE=1 HFT_ROUND=1 axolotl train config.yml      # no `adapter:`, no `unfrozen_parameters:`

Axolotl trains with ``AxolotlTrainer``, a subclass of ``transformers.Trainer``, so the half is
chosen, frozen and masked by the transformers adapter (``Trainer._prepare_for_training``), and
``hft_selection.json`` lands beside the saved model and in every checkpoint. ``axolotl train``
re-launches itself under ``accelerate launch`` by default; the worker is a fresh interpreter that
inherits ``HFT_ENABLE`` and arms itself through the start-up hook.

What this adapter adds is a guard. HFT chooses the trained half itself, so Axolotl's own ways of
choosing what trains are refused before training starts:

* ``adapter:`` (``lora``, ``qlora``, ``llama-adapter`` or a plugin's adapter), or ``lora_model_dir``;
* ``unfrozen_parameters:`` (Axolotl then freezes every parameter no pattern matches).

The guard is an Axolotl plugin (``axolotl.integrations.base.BasePlugin``) whose
``post_trainer_create`` hook checks the validated config. That hook runs only on the training path
(``setup_model_and_trainer``), after the trainer is built and before ``trainer.train``; the model
hooks (``pre_model_load``...) also run for ``axolotl inference`` and ``merge-lora``, which must keep
working with ``HFT_ENABLE`` set. With the start-up hook the plugin is added to Axolotl's
``PluginManager`` when ``axolotl.integrations.base`` is imported, so the YAML needs no
``plugins:`` entry. ``freeze_mm_modules`` (a multimodal model's vision and audio towers) is not
refused, as LLaMA-Factory's frozen vision tower is not; multimodal models were not tested here.

Configure HFT through the ``HFT_*`` variables.

    >>> from hft_plugin.adapters.axolotl import AxolotlAdapter, conflicting_options
    >>> AxolotlAdapter.instruments
    ('axolotl >= 0.19, < 0.20',)
    >>> conflicting_options({"adapter": "lora", "unfrozen_parameters": ["lm_head.*"]})
    ['adapter: lora', "unfrozen_parameters: ['lm_head.*']"]
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from ..errors import IntegrationError
from .base import Adapter

logger = logging.getLogger("hft_plugin")

PLUGIN_MODULE = "axolotl.integrations.base"
PLUGIN_KEY = "hft_plugin.adapters.axolotl.HFTPlugin"
"""The plugin's name in Axolotl's ``PluginManager.plugins`` (Axolotl names plugins ``module.Class``)."""

_CONFLICTS = ("adapter", "lora_model_dir", "unfrozen_parameters")


def conflicting_options(cfg: Mapping[str, Any]) -> list[str]:
    """The Axolotl config keys, as ``"key: value"``, that choose what trains and so conflict with HFT."""
    return [f"{key}: {cfg.get(key)}" for key in _CONFLICTS if cfg.get(key)]


def check_config(cfg: Mapping[str, Any]) -> None:
    """Raise :class:`~hft_plugin.IntegrationError` if ``cfg`` (Axolotl's validated config) asks for
    an adapter or for its own freezing. Changes nothing."""
    found = conflicting_options(cfg)
    if found:
        raise IntegrationError(
            f"HFT_ENABLE is set but the Axolotl config has {', '.join(found)}: Half Fine-Tuning trains "
            "half of the full model's own weights and chooses that half itself. Remove `adapter:`/"
            "`lora_model_dir:` and `unfrozen_parameters:` from the YAML to train with HFT, or unset "
            "HFT_ENABLE to train without it."
        )


_PLUGIN_CLASS: list[type] = []


def plugin_class() -> type:
    """The Axolotl plugin class (built on first use: ``BasePlugin`` is Axolotl's, imported only then)."""
    if not _PLUGIN_CLASS:
        from axolotl.integrations.base import BasePlugin

        class HFTPlugin(BasePlugin):
            """Refuses Axolotl configs that choose what trains (see :func:`check_config`)."""

            def post_trainer_create(self, cfg, trainer) -> None:
                check_config(cfg)

        _PLUGIN_CLASS.append(HFTPlugin)
    return _PLUGIN_CLASS[0]


def _manager():
    from axolotl.integrations.base import PluginManager

    return PluginManager.get_instance()


class AxolotlAdapter(Adapter):
    """Adds the HFT plugin to Axolotl's plugin manager (and removes it again). Applying HFT itself
    is the transformers adapter's work; ``config`` is accepted for the common lifecycle only."""

    name = "axolotl"
    instruments = ("axolotl >= 0.19, < 0.20",)
    def _instrument(self, **options: Any) -> None:
        # Every active instance holds the registration and the last to go removes it (if this module
        # made it), so one uninstrument() cannot take the plugin away from another instance.
        plugins = _manager().plugins
        if not _REGISTRATION["holders"]:
            _REGISTRATION["ours"] = PLUGIN_KEY not in plugins
            if _REGISTRATION["ours"]:
                plugins[PLUGIN_KEY] = plugin_class()()
            else:
                logger.warning("hft_plugin: the HFT plugin is already registered with Axolotl.")
        _REGISTRATION["holders"].append(self)

    def _uninstrument(self) -> None:
        holders = _REGISTRATION["holders"]
        if self in holders:
            holders.remove(self)
        if not holders and _REGISTRATION["ours"]:
            _manager().plugins.pop(PLUGIN_KEY, None)
            _REGISTRATION["ours"] = False


_REGISTRATION: dict[str, Any] = {"holders": [], "ours": False}  # the instances holding it; whether we added it
